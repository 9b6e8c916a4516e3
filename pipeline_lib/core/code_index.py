"""The code part of a stage's cache key: the project's modules parsed (without docstrings), the definitions a task
function uses, the pipeline_lib modules it reaches through their imports, and the libraries they import.

cachekey turns these parts, with the parts of the stage's inputs, into the key.
"""

from __future__ import annotations

import ast
import functools
import hashlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from pipeline_lib.core.workspace import digest_of

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
    "open_clip": "open-clip-torch",  # the foundation extra: CLIP image encoders (learn/foundation.py)
    "timm": "timm",  # the foundation extra: DINOv2
}


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


def producer_parts(*functions: Callable[..., Any], index: CodeIndex | None = None) -> dict[str, str]:
    """The code and library parts of the functions that make a per-image artifact (a hash, a tensor, an embedding).

    Derived as a stage's code parts are (`CodeIndex.task_parts`): each function's definition and the definitions it
    uses, the pipeline_lib modules they reach, the versions of the libraries they import. A per-image cache keyed by
    these parts is recomputed exactly when the code that made its entries changes, with no version to bump by hand.
    """
    index = index or CodeIndex()
    parts: dict[str, str] = {}
    for function in functions:
        found = index.task_parts(function.__module__, function.__name__)
        parts[f"code.producer.{function.__module__}:{function.__name__}"] = found.pop("code.task")
        parts |= found
    return parts


def producer_digest(*functions: Callable[..., Any], index: CodeIndex | None = None) -> str:
    """One digest of producer_parts: the name of a per-image cache made by these functions (a folder or file name)."""
    return digest_of(*(f"{name}={value}" for name, value in sorted(producer_parts(*functions, index=index).items())))


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
