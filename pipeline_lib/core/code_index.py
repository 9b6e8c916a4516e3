"""The code part of a stage's cache key: the project's modules parsed (without docstrings and without the annotations
that never run), the definitions a task function uses, the pipeline_lib modules it reaches through their imports, the
data files those modules read (DATA_FILES) and the libraries they import.

cachekey turns these parts, with the parts of the stage's inputs, into the key. The same parts of the functions that
make a per-image cache's entries (producer_parts) name that cache, so that a code change recomputes its entries.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from pipeline_lib.core.workspace import atomic_write_text, digest_of, file_sha256

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
    "scipy": "scipy",  # the DCT of the perceptual hash
    "jinja2": "Jinja2",  # renders the report
    "cv2": "opencv-python-headless",  # counts faces for the review hints (the `faces` extra)
    "open_clip": "open-clip-torch",  # the foundation extra: CLIP image encoders (learn/foundation.py)
    "timm": "timm",  # the foundation extra: DINOv2
}
# Non-Python files a module reads at run time, as globs relative to the project root: each file's content is a
# `data.<path>` part of every key that reaches the module. tests/core/test_code_index.py fails on a file inside the
# packages that no glob covers, so a new template cannot be left out of the keys.
DATA_FILES: dict[str, tuple[str, ...]] = {
    "pipeline_lib.assess.report": ("pipeline_lib/assess/templates/*",),
}
PRODUCER_CHARS = 16  # hex characters of a producer digest in a cache's file or folder name


class CacheKeyError(TypeError):
    """A stage's key cannot be made: an input has no stable content digest (say how to describe it in
    cachekey.value_text), or a task names a definition its module does not have."""


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


class _WithoutAnnotations(ast.NodeTransformer):
    """Drops the annotations that never run: of function arguments and returns, and of variables outside class
    bodies (`x: int = 1` becomes `x = 1`, a bare `x: int` goes). An annotated attribute of a class body stays: it
    defines a dataclass or pydantic field, and its type is how pydantic validates the field."""

    def visit_ClassDef(self, node: ast.ClassDef) -> ast.ClassDef:
        node.body = [child if isinstance(child, ast.AnnAssign) else self.visit(child) for child in node.body]
        node.decorator_list = [self.visit(child) for child in node.decorator_list]
        return node

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> ast.AST:
        arguments = node.args
        for argument in (*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs):
            argument.annotation = None
        for argument in (arguments.vararg, arguments.kwarg):
            if argument is not None:
                argument.annotation = None
        node.returns = None
        return self.generic_visit(node)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_AnnAssign(self, node: ast.AnnAssign) -> ast.AST | None:
        if node.value is None:
            return None
        return ast.Assign(targets=[node.target], value=self.visit(node.value))


def _strip_annotations(tree: ast.Module) -> ast.Module:
    """The tree without the annotations that never run (modified in place: the caller owns the parsed tree)."""
    return _WithoutAnnotations().visit(tree)


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
    tree: ast.Module  # without docstrings and the annotations that never run
    digest: str
    imports: Mapping[str, tuple[str, str | None]]  # local name -> (module, attribute or None), top level only
    modules: frozenset[str]  # every module imported anywhere at run time (absolute names)


@functools.lru_cache(maxsize=256)
def _parse_file(module: str, path: str, mtime_ns: int, size: int) -> ParsedModule:
    """A parsed module; memoised by file stamp, so that each flow run re-reads only files that changed."""
    tree = _strip_annotations(_strip_docstrings(ast.parse(Path(path).read_text(encoding="utf-8"), filename=path)))
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


Stamp = tuple[int, int]  # (mtime_ns, size) of a file; (-1, -1) when it is gone


def _stamp(path: Path | str) -> Stamp:
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return (-1, -1)
    return (stat.st_mtime_ns, stat.st_size)


@dataclass
class CodeIndex:
    """Parses the project's modules once per index (one index per flow run) and answers code and library parts.

    With a `remembered` file (a flow run's: in its workspace's cache), the parts of each task are kept there with
    the (mtime, size) of every file they were derived from and the list of the project's modules: a later index
    takes them while none of those changed, instead of parsing the project's code again (a second or more of a run
    whose stages are all cached). The library versions are looked up afresh each time.
    """

    root: Path = PROJECT_ROOT
    remembered: Path | None = None
    _parsed: dict[str, ParsedModule | None] = field(default_factory=dict)
    _stamps: dict[str, Stamp] = field(default_factory=dict)  # every file read: path -> (mtime_ns, size)
    _data: dict[str, str] = field(default_factory=dict)  # data file (relative path) -> sha256
    _tasks: dict[str, tuple[dict[str, str], list[str]]] = field(default_factory=dict)  # code parts, libraries
    _record: dict[str, Any] | None = None  # the remembered file's content, read once
    _listings: dict[tuple[str, ...], str] = field(default_factory=dict)

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
        stamp = self._stamps[str(path)] = _stamp(path)
        return _parse_file(module, str(path), *stamp)

    def files_read(self) -> dict[str, Stamp]:
        """(mtime_ns, size) of every source and data file this index has read, by path."""
        return dict(self._stamps)

    def data_parts(self, modules: Iterable[str]) -> dict[str, str]:
        """`data.<path>`: the content digest of every data file the modules read (DATA_FILES)."""
        parts: dict[str, str] = {}
        for module in modules:
            for pattern in DATA_FILES.get(module, ()):
                for path in sorted(p for p in self.root.glob(pattern) if p.is_file()):
                    relative = path.relative_to(self.root).as_posix()
                    if relative not in self._data:
                        self._stamps[str(path)] = _stamp(path)
                        self._data[relative] = file_sha256(path)
                    parts[f"data.{relative}"] = self._data[relative]
        return parts

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
        """`code.task`, `code.<module>` per pipeline_lib module reached, `data.*` of the data files the task's
        modules read and `lib.*` of a task function."""
        name = f"{module}:{function}"
        if name not in self._tasks:
            self._tasks[name] = _recall(self, name) or self._derive(module, function)
        code, libraries = self._tasks[name]
        return code | {f"lib.{LIBRARIES[n]}": library_version(LIBRARIES[n]) for n in libraries}

    def _derive(self, module: str, function: str) -> tuple[dict[str, str], list[str]]:
        """(code and data parts, library import names) of a task function, from its code (and remembered)."""
        walk = _TaskWalk(self)
        walk.visit(module, function)
        task_digest = digest_of(*(f"{name}:{digest}" for name, digest in sorted(walk.definitions.items())))
        modules = self.closure(walk.modules)
        parts = {"code.task": task_digest}
        parts |= {f"code.{m}": parsed.digest for m in modules if (parsed := self.parse(m)) is not None}
        defined_in = {name.split(":")[0] for name in walk.definitions}
        read = sorted(defined_in | set(modules))
        parts |= self.data_parts(read)
        libraries = sorted(set(walk.libraries) | self.imported_libraries(modules))
        _remember(self, f"{module}:{function}", (parts, libraries), read)
        return parts, libraries


def producer_parts(*functions: Callable[..., Any], index: CodeIndex | None = None) -> dict[str, str]:
    """The code and library parts of the functions that make a per-image artifact (a hash, a tensor, an embedding).

    Derived as a stage's code parts are (`CodeIndex.task_parts`): each function's definition and the definitions it
    uses, the pipeline_lib modules they reach, the data files they read, the versions of the libraries they import.
    A per-image cache keyed by these parts is recomputed exactly when the code that made its entries changes, with no
    version to bump by hand. CacheKeyError if a function's source file is not in the project.
    """
    index = index or CodeIndex()
    parts: dict[str, str] = {}
    for function in functions:
        module, name = function.__module__, function.__name__
        if index.parse(module) is None:
            raise CacheKeyError(f"the source of {module}.{name} is not under {index.root}: it cannot key a cache")
        found = index.task_parts(module, name)
        parts[f"code.producer.{module}:{name}"] = found.pop("code.task")
        parts |= found
    return parts


def producer_digest(*functions: Callable[..., Any], index: CodeIndex | None = None, root: Path = PROJECT_ROOT) -> str:
    """One digest of producer_parts: the name of a per-image cache made by these functions (a folder or file name).

    Without an index (the project's code under root) it is remembered for the life of the process and derived again
    only when a file it was derived from changes: a few stat calls per call, so it is cheap to ask per image, and a
    worker process (a process pool's, a Dask worker) derives it from the code it runs.
    """
    if index is not None:
        return _parts_digest(producer_parts(*functions, index=index))
    key = (str(root), tuple(f"{f.__module__}:{f.__qualname__}" for f in functions))
    known = _PRODUCERS.get(key)
    if known is None or any(_stamp(path) != stamp for path, stamp in known[1].items()):
        fresh = CodeIndex(root)
        known = _PRODUCERS[key] = (_parts_digest(producer_parts(*functions, index=fresh)), fresh.files_read())
    return known[0]


def producer_code(*functions: Callable[..., Any]) -> str:
    """The short producer digest that a per-image cache's file or folder name carries."""
    return producer_digest(*functions)[:PRODUCER_CHARS]


# Process-wide memo of producer_digest (like _parse_file's): (root, functions) -> (digest, stamps of the files read).
_PRODUCERS: dict[tuple[str, tuple[str, ...]], tuple[str, dict[str, Stamp]]] = {}


def _parts_digest(parts: Mapping[str, str]) -> str:
    return digest_of(*(f"{name}={value}" for name, value in sorted(parts.items())))


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
        local = _local_imports(node, module)
        for used in sorted(_names_used(node)):
            self._resolve(parsed, used, local)

    def _resolve(self, parsed: ParsedModule, used: str, local: Mapping[str, tuple[str, str | None]]) -> None:
        """Follow one name: a definition of the same module, a pipeline_lib module, a project definition, a library
        (imported at the top of the module or inside the definition that uses it)."""
        if used not in local and _top_level(parsed.tree, used) is not None:
            self.visit(parsed.name, used)
            return
        source, attribute = local.get(used) or parsed.imports.get(used, ("", None))
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


def _local_imports(node: ast.AST, module: str) -> dict[str, tuple[str, str | None]]:
    """The alias table of the imports inside a definition (a library or module imported where it is used)."""
    aliases, _ = _imports_of(ast.Module(body=list(_statements(node)), type_ignores=[]), module)
    return aliases


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
    """Every name read inside node (the roots of attribute chains included). The parsed trees hold no annotations
    but those of class attributes (fields: their types count); the others are never evaluated, so the code they
    name does not run."""
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


@functools.lru_cache(maxsize=64)
def library_version(distribution: str) -> str:
    """The installed version of a distribution, or 'absent' (looked up once per process)."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "absent"


# ---------------------------------------------------------------------------------------------------------------
# Task parts remembered between processes (CodeIndex.remembered): JSON, so that reading it runs no code.

REMEMBERED_FORMAT = 1
DERIVER = Path(__file__)  # this module: parts it derived are remembered only while it is unchanged


def _module_listing(index: CodeIndex, packages: Iterable[str]) -> str:
    """Digest of the names of every module file in the packages: a module added or removed where a task's imports
    look changes what they resolve to."""
    key = tuple(sorted(set(packages)))
    if key not in index._listings:
        found = (
            path.relative_to(index.root).as_posix() for package in key for path in (index.root / package).rglob("*.py")
        )
        index._listings[key] = digest_of(*sorted(found))
    return index._listings[key]


def _record(index: CodeIndex) -> dict[str, Any]:
    """The remembered record, read once per index (a fresh one when there is none, it is unreadable, or was made for
    another project root or by another version of this module)."""
    if index._record is None:
        fresh = {"format": REMEMBERED_FORMAT, "root": str(index.root), "deriver": list(_stamp(DERIVER)), "tasks": {}}
        index._record = fresh
        path = index.remembered
        try:
            data = json.loads(path.read_text(encoding="utf-8")) if path is not None and path.is_file() else None
        except (OSError, ValueError):
            data = None
        if isinstance(data, dict) and isinstance(data.get("tasks"), dict):
            if all(data.get(name) == fresh[name] for name in ("format", "root", "deriver")):
                index._record = data
    return index._record


def _recall(index: CodeIndex, name: str) -> tuple[dict[str, str], list[str]] | None:
    """The remembered (code parts, libraries) of a task while every file they came from is unchanged, else None."""
    if index.remembered is None:
        return None
    entry = _record(index)["tasks"].get(name)
    try:
        if not all(list(_stamp(path)) == stamp for path, stamp in entry["files"].items()):
            return None
        if entry["listing"] != _module_listing(index, entry["packages"]):
            return None
        return {str(k): str(v) for k, v in entry["parts"].items()}, [str(n) for n in entry["libraries"]]
    except (KeyError, TypeError, AttributeError):  # none remembered, or not in the shape written here
        return None


def _remember(index: CodeIndex, name: str, derived: tuple[dict[str, str], list[str]], modules: list[str]) -> None:
    """Keep a task's derived parts in index.remembered (if any), with the stamps its files had when they were read."""
    if index.remembered is None:
        return
    parts, libraries = derived
    paths = [str(path) for module in modules if (path := index.path_of(module)) is not None]
    paths += [str(index.root / name.removeprefix("data.")) for name in parts if name.startswith("data.")]
    packages = sorted({module.split(".")[0] for module in modules})
    record = _record(index)
    record["tasks"][name] = {
        "parts": parts,
        "libraries": libraries,
        "files": {path: list(index._stamps.get(path) or _stamp(path)) for path in paths},
        "packages": packages,
        "listing": _module_listing(index, packages),
    }
    try:
        atomic_write_text(index.remembered, json.dumps(record, sort_keys=True))
    except OSError as error:  # a read-only workspace: the next run derives them again
        log.debug("task parts not remembered in %s: %s", index.remembered, error)
