"""Stage cache keys: the named parts a stage's result depends on, and one digest of them.

Every cached stage is keyed the same way (tasks/caching.py turns this into a Prefect cache policy):

- `input.<parameter>`: each argument of the stage's task: a Ref by its content digest, a config section by its
  JSON, a list of chunk rows by their JSON. Parameters in UNKEYED (the workspace root, chunk sizes, resume) are
  left out: they never change a result.
- `file.<where>`: the content of every file a config section only names (keyword lists, URL lists, `csv:` group
  files, a folder's listing, a state_dict given as train.weights): see NAMED_FILES.
- `code.task` and `code.<module>`: the task function with the definitions it uses in its own package, and each
  pipeline_lib module it reaches, followed through their imports. Comments, docstrings and formatting do not
  count (the digest is over the syntax tree).
- `lib.<distribution>`: the versions of the libraries in LIBRARIES that this code imports (torch, torchvision,
  Pillow, ImageHash, grad-cam, numpy): their output is what a stage stores.

The key is the digest of all parts. The parts themselves are logged on the stage's MLflow run, with the names of
those that changed since the stage's previous run, so a user can see why a stage ran again.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from pipeline_lib.core.config import SourcesConfig, TrainConfig
from pipeline_lib.core.workspace import Ref, digest_of, file_sha256, listing_digest

log = logging.getLogger(__name__)

PACKAGE = "pipeline_lib"
PROJECT_ROOT = Path(__file__).resolve().parents[2]  # holds pipeline_lib/, tasks/ and flows/
# top-level import name -> distribution whose version keys the stages that import it
LIBRARIES: dict[str, str] = {
    "torch": "torch",
    "torchvision": "torchvision",
    "PIL": "Pillow",
    "imagehash": "ImageHash",
    "pytorch_grad_cam": "grad-cam",
    "numpy": "numpy",
}
DISPLAY_LIMIT = 500  # characters of a part's value shown on the stage's MLflow run
# Parameters that never change a stage's result: where the workspace is, how work is chunked, whether an interrupted
# training continues, and where live progress and the run's crawl-health notes go (StageRecorder.run's live arguments).
UNKEYED: frozenset[str] = frozenset({"root", "chunk_size", "resume", "progress", "health_notes"})


class CacheKeyError(TypeError):
    """A stage input has no stable content digest (say how to describe it in value_text)."""


# ---------------------------------------------------------------------------------------------------------------
# Inputs


def _plain(value: Any) -> Any:
    """A JSON-ready form of a task input: Refs by digest, pydantic models by their fields, dataclasses by fields."""
    if isinstance(value, Ref):
        return {"ref": value.digest}
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, str | int | float | bool):
        return value
    raise CacheKeyError(
        f"a stage input of type {type(value).__name__} has no content digest: pass a Ref, a config section, "
        "a dataclass or plain values (see pipeline_lib/core/cachekey.py)"
    )


def value_text(value: Any) -> str:
    """The canonical text of one input: a Ref's digest, else sorted JSON of its plain form."""
    if isinstance(value, Ref):
        return value.digest
    return json.dumps(_plain(value), sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def _file_text(path: Path | None) -> str:
    """sha256 of a file the config names, or 'missing' (the stage then fails with its own clear error)."""
    if path is None:
        return "none"
    return file_sha256(path) if Path(path).is_file() else "missing"


def _group_csv(folder: Path, group_by: str) -> Path | None:
    if not group_by.startswith("csv:"):
        return None
    csv_path = Path(group_by.removeprefix("csv:"))
    return csv_path if csv_path.is_absolute() else folder / csv_path


def source_files(sources: SourcesConfig) -> dict[str, str]:
    """Digests of the files sources names: keyword files, URL lists, folders' listings and their group CSVs."""
    parts: dict[str, str] = {}
    for index, search in enumerate(sources.search):
        if search.keywords_file is not None:
            parts[f"file.search.{index}.keywords_file"] = _file_text(search.keywords_file)
    for index, urls in enumerate(sources.urls):
        parts[f"file.urls.{index}.csv"] = _file_text(urls.csv)
    for index, folder in enumerate(sources.folders):
        parts[f"file.folders.{index}.listing"] = listing_digest([Path(folder.path)])
        group_csv = _group_csv(Path(folder.path), folder.group_by)
        if group_csv is not None:
            parts[f"file.folders.{index}.group_csv"] = _file_text(group_csv)
    return parts


def train_files(config: TrainConfig) -> dict[str, str]:
    """The digest of a state_dict file given as train.weights (names such as 'imagenet' are keyed as text)."""
    if config.weights in ("imagenet", "none"):
        return {}
    return {"file.train.weights": _file_text(Path(config.weights).expanduser())}


# Config sections that name files, and how to digest those files. A new config key that names a file or folder
# belongs here, so that a change of the file's content changes the key of every stage that takes the section.
NAMED_FILES: dict[type, Callable[[Any], dict[str, str]]] = {
    SourcesConfig: source_files,
    TrainConfig: train_files,
}


def input_parts(inputs: Mapping[str, Any]) -> dict[str, str]:
    """`input.<name>` per keyed input, plus `file.*` for the files that config sections among them name."""
    parts: dict[str, str] = {}
    for name, value in sorted(inputs.items()):
        if name in UNKEYED:
            continue
        parts[f"input.{name}"] = value_text(value)
        describe = NAMED_FILES.get(type(value))
        if describe is not None:
            parts |= describe(value)
    return parts


# ---------------------------------------------------------------------------------------------------------------
# Code


_BLOCKS = ("body", "orelse", "finalbody", "handlers")  # the statement lists a statement can hold


def _statements(node: ast.AST, skip_type_checking: bool = False) -> Iterator[ast.AST]:
    """Every statement under node (not expressions: imports and docstrings are statements), depth first."""
    for name in _BLOCKS:
        for child in getattr(node, name, None) or []:
            if isinstance(child, ast.stmt | ast.excepthandler | ast.match_case):
                if skip_type_checking and _is_type_checking(child):
                    continue
                yield child
                yield from _statements(child, skip_type_checking)
    for case in getattr(node, "cases", None) or []:
        yield from _statements(case, skip_type_checking)


def _strip_docstrings(tree: ast.Module) -> ast.Module:
    """The tree without docstrings (modified in place: the caller owns the freshly parsed tree)."""
    for node in [tree, *_statements(tree)]:
        if isinstance(node, ast.Module | ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                if isinstance(body[0].value.value, str):
                    node.body = body[1:] or [ast.Pass()]
    return tree


def node_digest(node: ast.AST) -> str:
    """Digest of a syntax tree without positions: comments, docstrings and layout do not change it."""
    return hashlib.sha256(ast.dump(node, include_attributes=False).encode("utf-8")).hexdigest()


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


@dataclass(frozen=True)
class ParsedModule:
    """One project module: its name, the digest of its code, and what it imports (names -> targets)."""

    name: str
    tree: ast.Module  # without docstrings
    digest: str
    imports: Mapping[str, tuple[str, str | None]]  # local name -> (module, attribute or None), top level only
    modules: frozenset[str]  # every module imported anywhere at run time (absolute names)


@functools.lru_cache(maxsize=256)
def _parse_file(module: str, path: str, mtime_ns: int, size: int) -> ParsedModule:
    """A parsed module; memoised by file stamp, so that each flow run re-reads only files that changed."""
    tree = _strip_docstrings(ast.parse(Path(path).read_text(encoding="utf-8"), filename=path))
    aliases, modules = _imports_of(tree, module)
    return ParsedModule(module, tree, node_digest(tree), aliases, modules)


def _absolute(module: str | None, level: int, current: str) -> str:
    if level == 0:
        return module or ""
    base = current.split(".")[: -level or None]
    return ".".join([*base, *([module] if module else [])])


def _imports_of(tree: ast.Module, name: str) -> tuple[dict[str, tuple[str, str | None]], frozenset[str]]:
    """(top-level alias table, every module imported at run time) of a module."""
    aliases: dict[str, tuple[str, str | None]] = {}
    modules: set[str] = set()
    top = set(map(id, tree.body))
    for node in _statements(tree, skip_type_checking=True):  # imports under `if TYPE_CHECKING:` never run
        if isinstance(node, ast.Import):
            for alias in node.names:
                modules.add(alias.name)
                if id(node) in top:
                    aliases[alias.asname or alias.name.split(".")[0]] = (
                        (alias.name, None) if alias.asname else (alias.name.split(".")[0], None)
                    )
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(node.module, node.level, name)
            modules.add(source)
            for alias in node.names:
                modules.add(f"{source}.{alias.name}")  # may name a submodule; unknown names are dropped later
                if id(node) in top:
                    aliases[alias.asname or alias.name] = (source, alias.name)
    return aliases, frozenset(modules)


@dataclass
class CodeIndex:
    """Parses the project's modules once per index (one index per flow run) and answers code and library parts."""

    root: Path = PROJECT_ROOT
    _parsed: dict[str, ParsedModule | None] = field(default_factory=dict)

    def path_of(self, module: str) -> Path | None:
        """The source file of a project module (a package's __init__.py), or None for any other module."""
        base = self.root.joinpath(*module.split("."))
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if module and candidate.is_file():
                return candidate
        return None

    def parse(self, module: str) -> ParsedModule | None:
        """The parsed project module, or None when the name is not a project module."""
        if module not in self._parsed:
            path = self.path_of(module)
            self._parsed[module] = None if path is None else self._read(module, path)
        return self._parsed[module]

    def _read(self, module: str, path: Path) -> ParsedModule:
        stat = path.stat()
        return _parse_file(module, str(path), stat.st_mtime_ns, stat.st_size)

    def closure(self, roots: Iterable[str]) -> list[str]:
        """The pipeline_lib modules reachable from roots through imports anywhere in them, sorted."""
        seen: set[str] = set()
        todo = [m for m in roots if _in_package(m)]
        while todo:
            name = todo.pop()
            parsed = self.parse(name)
            if name in seen or parsed is None:
                continue
            seen.add(name)
            todo.extend(m for m in parsed.modules if _in_package(m))
        return sorted(seen)

    def imported_libraries(self, modules: Iterable[str]) -> set[str]:
        """The import names of LIBRARIES that any of the modules imports at run time."""
        names: set[str] = set()
        for module in modules:
            parsed = self.parse(module)
            if parsed is not None:
                names |= {m.split(".")[0] for m in parsed.modules}
        return names & set(LIBRARIES)

    def task_parts(self, module: str, function: str) -> dict[str, str]:
        """`code.task`, `code.<module>` per pipeline_lib module reached and `lib.*` of a task function."""
        walk = _TaskWalk(self)
        walk.visit(module, function)
        task_digest = digest_of(*(f"{name}:{digest}" for name, digest in sorted(walk.definitions.items())))
        modules = self.closure(walk.modules)
        parts = {"code.task": task_digest}
        parts |= {f"code.{m}": parsed.digest for m in modules if (parsed := self.parse(m)) is not None}
        libraries = set(walk.libraries) | self.imported_libraries(modules)
        return parts | {f"lib.{LIBRARIES[n]}": library_version(LIBRARIES[n]) for n in sorted(libraries)}


def _in_package(module: str) -> bool:
    """Whether module is a pipeline_lib module (the package's empty __init__ is not one)."""
    return module.startswith(PACKAGE + ".")


class _TaskWalk:
    """From a task function: the definitions it uses outside pipeline_lib, the modules and libraries it reaches."""

    def __init__(self, index: CodeIndex) -> None:
        self.index = index
        self.definitions: dict[str, str] = {}  # "<module>:<name>" -> digest of its syntax tree
        self.modules: set[str] = set()  # pipeline_lib modules used directly
        self.libraries: set[str] = set()  # import names of LIBRARIES used directly

    def visit(self, module: str, name: str) -> None:
        """Record the definition of name in module and everything it uses, recursively."""
        key = f"{module}:{name}"
        parsed = self.index.parse(module)
        if key in self.definitions or parsed is None:
            return
        node = _top_level(parsed.tree, name)
        if node is None:
            raise CacheKeyError(f"{name!r} is not a top-level definition of {module}")
        self.definitions[key] = node_digest(node)  # the module's tree has no docstrings
        for used in sorted(_names_used(node)):
            self._resolve(parsed, used)

    def _resolve(self, parsed: ParsedModule, used: str) -> None:
        """Follow one name: a definition of the same module, a pipeline_lib module, a project definition, a library."""
        if _top_level(parsed.tree, used) is not None:
            self.visit(parsed.name, used)
            return
        source, attribute = parsed.imports.get(used, ("", None))
        submodule = f"{source}.{attribute}" if attribute else source
        is_module = self.index.parse(submodule) is not None
        if _in_package(submodule) and is_module:
            self.modules.add(submodule)
        elif _in_package(source):
            self.modules.add(source)  # a name defined in a pipeline_lib module
        elif attribute and not is_module and self.index.parse(source) is not None:
            self.visit(source, attribute)  # a definition imported from another project module (e.g. tasks.*)
        elif source.split(".")[0] in LIBRARIES:
            self.libraries.add(source.split(".")[0])


def _top_level(tree: ast.Module, name: str) -> ast.AST | None:
    """The module-level def, class or assignment that binds name, or None."""
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and node.name == name:
            return node
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            return node
    return None


def _names_used(node: ast.AST) -> set[str]:
    """Every name read inside node (the roots of attribute chains included), outside type annotations: with
    `from __future__ import annotations` they are never evaluated, so the code they name does not run."""
    annotations = [
        part
        for n in ast.walk(node)
        for part in (
            [a.annotation for a in (*n.args.posonlyargs, *n.args.args, *n.args.kwonlyargs)]
            + [a.annotation for a in (n.args.vararg, n.args.kwarg) if a is not None]
            + [n.returns]
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
            else [n.annotation]
            if isinstance(n, ast.AnnAssign)
            else []
        )
        if part is not None
    ]
    skipped = {id(n) for annotation in annotations for n in ast.walk(annotation)}
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and id(n) not in skipped}


def library_version(distribution: str) -> str:
    """The installed version of a distribution, or 'absent'."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "absent"


# ---------------------------------------------------------------------------------------------------------------
# Keys


@dataclass(frozen=True)
class StageKey:
    """The named parts of one stage's cache key and their digest."""

    parts: Mapping[str, str]

    @property
    def digest(self) -> str:
        """The key: a digest of every part, by name."""
        return digest_of(*(f"{name}={value}" for name, value in sorted(self.parts.items())))


def shown_parts(key: StageKey, limit: int = DISPLAY_LIMIT) -> dict[str, str]:
    """The parts as logged: a value longer than limit is shown as its digest and length."""
    return {
        name: value if len(value) <= limit else f"sha256:{digest_of(value)[:16]} ({len(value)} chars)"
        for name, value in sorted(key.parts.items())
    }


def changed_parts(current: Mapping[str, str], earlier: Mapping[str, str] | None) -> str:
    """A one-line answer to "why did this stage run again": the names of the parts that changed."""
    if earlier is None:
        return "(no earlier run of this stage)"
    names = sorted(n for n in set(current) | set(earlier) if current.get(n) != earlier.get(n))
    return ", ".join(names) or "(none: the key is unchanged)"


def stage_key(fixed: Mapping[str, str], inputs: Mapping[str, Any]) -> StageKey:
    """The key of one task run: its fixed parts (task, code, libraries) and the parts of its inputs."""
    return StageKey(dict(fixed) | input_parts(inputs))
