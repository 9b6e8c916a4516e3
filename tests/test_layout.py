"""The layout of pipeline_lib, read from its source: phases import only earlier phases, mlflow only in core/tracking,
prefect nowhere. Every import counts: at module level, inside functions and under `if TYPE_CHECKING:`."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pipeline_lib

# The phases in pipeline order; a module may import its own phase, earlier phases and core.
PHASES = ("core", "acquire", "curate", "learn", "assess", "ops")
TRACKING = "core.tracking"  # the module (or subpackage, or core/tracking_*.py) that alone talks to MLflow


@dataclass(frozen=True)
class Import:
    """One import statement's target, as an absolute dotted name, in the module at path:line."""

    module: str  # the importing module, e.g. pipeline_lib.learn.train
    target: str  # e.g. pipeline_lib.core.config, mlflow.pytorch
    where: str  # path:line, for the failure message


def module_name(root: Path, path: Path, package: str) -> str:
    """Dotted name of a source file under the package folder root (root/a/b.py -> package.a.b)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([package, *parts])


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The module a `from ... import` names, with relative imports resolved against the importing module."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _dynamic_target(node: ast.Call) -> str | None:
    """The constant name given to importlib.import_module(...) or __import__(...), else None."""
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    if name not in ("import_module", "__import__") or not node.args:
        return None
    first = node.args[0]
    return first.value if isinstance(first, ast.Constant) and isinstance(first.value, str) else None


def imports_of(root: Path, path: Path, package: str) -> list[Import]:
    """Every import in one file, wherever it stands (ast.walk reaches function bodies and TYPE_CHECKING blocks)."""
    module = module_name(root, path, package)
    is_package = path.name == "__init__.py"
    found: list[Import] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, module, is_package)
            # `from pkg.learn import models` imports pkg.learn.models: count the names as possible submodules too
            targets = [base, *(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")]
        elif isinstance(node, ast.Call) and (dynamic := _dynamic_target(node)):
            targets = [dynamic]
        found.extend(Import(module, target, f"{path}:{node.lineno}") for target in targets)
    return found


def package_imports(root: Path, package: str) -> list[Import]:
    """The imports of every module of the package whose folder is root."""
    return [item for path in sorted(root.rglob("*.py")) for item in imports_of(root, path, package)]


def _phase(name: str, package: str) -> str | None:
    """The phase of a dotted name inside package (package.<phase>...), else None."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == package else None


def phase_violations(imports: list[Import], package: str) -> list[tuple[Import, str]]:
    """Imports from a module of one phase into a later phase, or into the package outside the phases."""
    problems: list[tuple[Import, str]] = []
    for item in imports:
        target = _phase(item.target, package)
        if target is None:
            continue  # a third-party or standard library import, or the package itself
        source = _phase(item.module, package)
        if source not in PHASES:
            problems.append((item, f"{item.module} lies outside the phases"))
        elif target not in PHASES:
            problems.append((item, f"{item.target} lies outside the phases"))
        elif PHASES.index(target) > PHASES.index(source):
            problems.append((item, f"{source} imports the later phase {target}"))
    return problems


def _top(name: str) -> str:
    return name.split(".")[0]


def mlflow_violations(imports: list[Import], package: str) -> list[tuple[Import, str]]:
    """Imports of mlflow from anywhere but package.core.tracking (module, subpackage or core/tracking_*.py)."""
    allowed = f"{package}.{TRACKING}"
    return [
        (item, f"only {allowed} may import mlflow")
        for item in imports
        if _top(item.target) == "mlflow" and not item.module.startswith(allowed)
    ]


def prefect_violations(imports: list[Import]) -> list[tuple[Import, str]]:
    """Imports of prefect (or a prefect_* integration such as prefect_dask) from the package."""
    return [
        (item, "the library never imports prefect")
        for item in imports
        if _top(item.target) == "prefect" or _top(item.target).startswith("prefect_")
    ]


def explain(problems: list[tuple[Import, str]]) -> str:
    """One line per problem: where, what imports what, and why that is refused."""
    return "\n".join(sorted({f"{item.where}: {item.module} imports {item.target}: {why}" for item, why in problems}))


# --------------------------------------------------------------------------------------------------------------
# The checker on a small fake package (so that it can fail), then on pipeline_lib


def _write(root: Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _fake_package(tmp_path: Path) -> Path:
    """A package `fake` with one module per kind of import, allowed or not."""
    root = tmp_path / "fake"
    for phase in PHASES:
        _write(root, f"{phase}/__init__.py", "")
    _write(root, "__init__.py", "")
    _write(root, "core/base.py", "import os\nfrom fake.core import config\n")  # its own phase: fine
    _write(root, "core/late.py", "def f():\n    from fake.learn import models\n    return models\n")  # in a function
    _write(
        root,
        "acquire/typed.py",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..assess import report\n",
    )  # relative, type-checking only
    _write(root, "curate/dedup.py", "from .. import core\nfrom ..acquire import crawl\nimport fake.core.base\n")  # fine
    _write(root, "curate/sneaky.py", "import importlib\nimportlib.import_module('fake.ops.demo')\n")
    _write(root, "learn/train.py", "import mlflow.pytorch\nfrom fake.curate.dedup import x\n")  # mlflow outside
    _write(root, "core/tracking.py", "import mlflow\nfrom mlflow import MlflowClient\n")  # allowed
    _write(root, "core/tracking/runs.py", "def g():\n    import mlflow\n")  # a tracking subpackage: allowed
    _write(root, "assess/flowy.py", "def h():\n    from prefect import flow\n    import prefect_dask\n")
    _write(root, "ops/all.py", "from fake import core, acquire, curate, learn, assess\nfrom fake.ops import x\n")
    _write(root, "stray.py", "from fake.core import base\n")  # a module outside the phases
    _write(root, "ops/odd.py", "from fake.misc import thing\n")  # a package part that is no phase
    return root


def _pairs(problems: list[tuple[Import, str]]) -> set[tuple[str, str]]:
    """(importing module, imported target) of each problem."""
    return {(item.module, item.target) for item, _ in problems}


def test_the_checker_finds_later_phases_mlflow_and_prefect_wherever_they_are_imported(tmp_path: Path):
    root = _fake_package(tmp_path)
    imports = package_imports(root, "fake")
    assert _pairs(phase_violations(imports, "fake")) == {
        ("fake.core.late", "fake.learn"),  # inside a function
        ("fake.core.late", "fake.learn.models"),
        ("fake.acquire.typed", "fake.assess"),  # under TYPE_CHECKING, relative
        ("fake.acquire.typed", "fake.assess.report"),
        ("fake.curate.sneaky", "fake.ops.demo"),  # importlib.import_module
        ("fake.stray", "fake.core"),  # a module outside the phases
        ("fake.stray", "fake.core.base"),
        ("fake.ops.odd", "fake.misc"),  # a part of the package that is no phase
        ("fake.ops.odd", "fake.misc.thing"),
    }
    assert _pairs(mlflow_violations(imports, "fake")) == {("fake.learn.train", "mlflow.pytorch")}
    assert _pairs(prefect_violations(imports)) == {
        ("fake.assess.flowy", "prefect"),
        ("fake.assess.flowy", "prefect.flow"),
        ("fake.assess.flowy", "prefect_dask"),
    }


def test_relative_imports_resolve_from_modules_and_packages(tmp_path: Path):
    root = tmp_path / "fake"
    _write(root, "learn/__init__.py", "from . import models\nfrom ..core import config\n")
    _write(root, "learn/models.py", "from .augment import x\nfrom .. import assess\n")
    targets = {(item.module, item.target) for item in package_imports(root, "fake")}
    assert ("fake.learn", "fake.learn.models") in targets and ("fake.learn", "fake.core.config") in targets
    assert ("fake.learn.models", "fake.learn.augment") in targets and ("fake.learn.models", "fake.assess") in targets


def _pipeline_lib_imports() -> list[Import]:
    root = Path(pipeline_lib.__file__).parent
    imports = package_imports(root, "pipeline_lib")
    phases = {_phase(item.module, "pipeline_lib") for item in imports}
    assert set(PHASES) <= phases, f"no imports read from some phases: {set(PHASES) - phases}"  # not vacuous
    return imports


def test_no_phase_of_pipeline_lib_imports_a_later_phase():
    problems = phase_violations(_pipeline_lib_imports(), "pipeline_lib")
    assert not problems, "a phase imports a later one (order: " + " < ".join(PHASES) + "):\n" + explain(problems)


def test_only_core_tracking_imports_mlflow():
    imports = _pipeline_lib_imports()
    assert any(_top(item.target) == "mlflow" for item in imports), "core/tracking talks to MLflow: its imports are read"
    problems = mlflow_violations(imports, "pipeline_lib")
    assert not problems, explain(problems)


def test_pipeline_lib_never_imports_prefect():
    problems = prefect_violations(_pipeline_lib_imports())
    assert not problems, explain(problems)
