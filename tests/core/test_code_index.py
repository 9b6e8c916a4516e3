"""The code part of stage keys (pipeline_lib.core.code_index) on a small project tree made in tmp_path (real files,
real parsing), and on the real stages."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline_lib.core.cachekey import StageKey, changed_parts
from pipeline_lib.core.code_index import DATA_FILES, PROJECT_ROOT, CacheKeyError, CodeIndex, producer_digest
from pipeline_lib.core.workspace import file_sha256
from tests.project_copy import copy_project, edit

TEMPLATES = PROJECT_ROOT / "pipeline_lib" / "assess" / "templates"

# A project with three pipeline_lib modules (a imports b; c stands alone) and a task module using two of them.
PROJECT = {
    "pipeline_lib/__init__.py": "",
    "pipeline_lib/a.py": '"""A."""\nimport numpy as np\n\nfrom pipeline_lib import b\n\n\ndef f():\n    return b.g()\n',
    "pipeline_lib/b.py": "def g():\n    return 1\n",
    "pipeline_lib/c.py": "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from pipeline_lib import a\n",
    "pipeline_lib/d.py": "import torch\n",
    "tasks/__init__.py": "",
    "tasks/shared.py": "from pipeline_lib import d\n\n\nclass Out:\n    pass\n\n\ndef unused():\n    return d\n",
    "tasks/t.py": (
        "from pipeline_lib import a\nfrom pipeline_lib.c import *  # noqa\nfrom tasks.shared import Out\n\n"
        "LIMIT = 3\n\n\n"
        "def helper(x):\n    return a.f() + x + LIMIT\n\n\ndef stage(root, ref):\n    return Out(), helper(1)\n\n\n"
        "def other(root):\n    return 2\n"
    ),
}


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    for name, text in PROJECT.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    return root


def _parts(root: Path, function: str = "stage") -> dict[str, str]:
    return CodeIndex(root).task_parts("tasks.t", function)


def test_code_parts_follow_the_task_into_pipeline_lib_imports(project: Path) -> None:
    parts = _parts(project)
    assert {k for k in parts if k.startswith("code.")} == {"code.task", "code.pipeline_lib.a", "code.pipeline_lib.b"}
    assert set(parts) - {k for k in parts if k.startswith("code.")} == {"lib.numpy"}, "torch is only in unused()"
    assert _parts(project, "other") == {"code.task": _parts(project, "other")["code.task"]}


def test_an_imported_module_change_changes_the_key_and_a_comment_does_not(project: Path) -> None:
    before = _parts(project)
    b = project / "pipeline_lib" / "b.py"
    b.write_text('"""Docstring."""\n# a comment\ndef g():\n    return 1  # same\n', encoding="utf-8")
    assert _parts(project) == before, "comments, docstrings and layout must not change the key"
    b.write_text("def g():\n    return 2\n", encoding="utf-8")
    after = _parts(project)
    assert StageKey(after).digest != StageKey(before).digest
    assert changed_parts(after, before) == "code.pipeline_lib.b"


def test_unused_definitions_and_other_modules_do_not_change_the_key(project: Path) -> None:
    before = _parts(project)
    (project / "pipeline_lib" / "c.py").write_text("X = 2\n", encoding="utf-8")  # imported with *, names unused
    (project / "tasks" / "t.py").write_text(PROJECT["tasks/t.py"].replace("return 2", "return 3"), encoding="utf-8")
    shared = PROJECT["tasks/shared.py"].replace("return d", "return None")
    (project / "tasks" / "shared.py").write_text(shared, encoding="utf-8")
    assert _parts(project) == before
    (project / "tasks" / "t.py").write_text(PROJECT["tasks/t.py"].replace("LIMIT = 3", "LIMIT = 4"), encoding="utf-8")
    assert changed_parts(_parts(project), before) == "code.task", "a constant the task uses is its code"


def test_the_real_stages_reach_their_modules() -> None:
    index = CodeIndex()
    train = index.task_parts("tasks.stages", "train")
    learn = ("train", "datasets", "steps", "checkpoints", "history", "augment", "models")
    expected = {f"code.pipeline_lib.learn.{name}" for name in learn} | {"lib.torch", "lib.torchvision"}
    assert expected <= set(train), sorted(expected - set(train))
    assert "code.pipeline_lib.curate.dedup" not in train
    assert not [part for part in train if part.startswith("code.pipeline_lib.core.tracking")], sorted(train)
    assert "code.pipeline_lib.core.tracking.versions" in index.task_parts("tasks.track", "register"), "not followed"
    dedup = index.task_parts("tasks.stages", "dedup")
    assert "code.pipeline_lib.curate.dedup" in dedup and "lib.torch" not in dedup
    hashes = index.task_parts("tasks.per_image", "hash_chunk")
    assert {"code.pipeline_lib.acquire.fingerprint", "lib.ImageHash", "lib.Pillow"} <= set(hashes)
    report = index.task_parts("tasks.stages", "make_report")
    assert "lib.grad-cam" in report and "code.pipeline_lib.assess.report" in report


def test_a_missing_definition_is_named(project: Path) -> None:
    shutil.rmtree(project / "tasks")
    (project / "tasks").mkdir()
    (project / "tasks" / "t.py").write_text("x = 1\n", encoding="utf-8")
    with pytest.raises(CacheKeyError, match="'stage' is not a top-level definition of tasks.t"):
        _parts(project)


def test_producer_digest_follows_a_library_function_into_the_modules_it_reaches(project: Path) -> None:
    import importlib
    import sys

    from pipeline_lib.core.code_index import producer_digest, producer_parts

    sys.path.insert(0, str(project))
    saved = {name: sys.modules.pop(name) for name in list(sys.modules) if name.split(".")[0] == "pipeline_lib"}
    try:
        f = importlib.import_module("pipeline_lib.a").f
        index = CodeIndex(project)
        parts = producer_parts(f, index=index)
        assert set(parts) == {"code.producer.pipeline_lib.a:f", "code.pipeline_lib.b"}, "f uses b, not numpy"
        before = producer_digest(f, index=CodeIndex(project))
        (project / "pipeline_lib" / "c.py").write_text("X = 2\n", encoding="utf-8")
        assert producer_digest(f, index=CodeIndex(project)) == before, "a module f never reaches does not count"
        (project / "pipeline_lib" / "b.py").write_text("def g():\n    return 2\n", encoding="utf-8")
        assert producer_digest(f, index=CodeIndex(project)) != before, "a change in a reached module must count"
    finally:
        sys.path.remove(str(project))
        for name in [n for n in sys.modules if n.split(".")[0] == "pipeline_lib"]:
            del sys.modules[name]
        sys.modules.update(saved)


def test_annotations_that_never_run_do_not_count_and_class_fields_do(project: Path) -> None:
    before = _parts(project)
    b = project / "pipeline_lib" / "b.py"
    b.write_text("LIMIT = 1\n\n\ndef g(x=0, *rest):\n    y = 1\n    return y\n")
    plain = _parts(project)
    annotated = "LIMIT: float = 1\nNAME: bytes\n\n\ndef g(x: str = 0, *rest: int) -> str:\n    y: int = 1\n    return y"
    b.write_text(annotated)
    assert _parts(project) == plain, "argument, return and variable annotations are never evaluated"
    b.write_text("class Row:\n    n: int = 1\n\n\ndef g():\n    return Row().n\n")
    field = _parts(project)
    b.write_text("class Row:\n    n: float = 1\n\n\ndef g():\n    return Row().n\n")
    assert changed_parts(_parts(project), field) == "code.pipeline_lib.b", "a class field's type is how it validates"
    assert changed_parts(plain, before) == "code.pipeline_lib.b"


def test_an_annotation_in_a_reached_module_leaves_the_train_key(tmp_path: Path) -> None:
    root = copy_project(tmp_path / "project")
    before = CodeIndex(root).task_parts("tasks.stages", "train")
    assert "code.pipeline_lib.learn.augment" in before
    augment = "pipeline_lib/learn/augment.py"
    edit(root, augment, "def _column(params: torch.Tensor, name: str) -> torch.Tensor:", "def _column(params, name):")
    assert CodeIndex(root).task_parts("tasks.stages", "train") == before, "an annotation changed the train key"
    edit(root, augment, "def _column(params, name):", "def _column(params, name, unused=None):")
    assert (
        changed_parts(CodeIndex(root).task_parts("tasks.stages", "train"), before) == "code.pipeline_lib.learn.augment"
    )


def test_a_template_the_report_reads_is_part_of_its_key(tmp_path: Path) -> None:
    root = copy_project(tmp_path / "project")
    before = CodeIndex(root).task_parts("tasks.stages", "make_report")
    assert before["data.pipeline_lib/assess/templates/report.html"] == file_sha256(TEMPLATES / "report.html")
    assert not [part for part in CodeIndex(root).task_parts("tasks.stages", "train") if part.startswith("data.")]
    template = root / "pipeline_lib" / "assess" / "templates" / "report.html"
    template.write_text(template.read_text(encoding="utf-8") + "<!-- edited -->\n", encoding="utf-8")
    after = CodeIndex(root).task_parts("tasks.stages", "make_report")
    assert changed_parts(after, before) == "data.pipeline_lib/assess/templates/report.html"


def test_every_data_file_in_the_packages_is_declared() -> None:
    declared = {path for patterns in DATA_FILES.values() for glob in patterns for path in PROJECT_ROOT.glob(glob)}
    found = {
        path
        for package in ("pipeline_lib", "tasks")
        for path in (PROJECT_ROOT / package).rglob("*")
        if path.is_file() and path.suffix not in (".py", ".pyc") and "__pycache__" not in path.parts
    }
    undeclared = sorted(path.relative_to(PROJECT_ROOT).as_posix() for path in found - declared)
    assert not undeclared, (
        f"{undeclared}: a file the code may read at run time; add it to code_index.DATA_FILES under the module "
        "that reads it, so that editing it recomputes the stages that use it"
    )


def test_imports_inside_a_definition_are_followed(project: Path) -> None:
    t = project / "tasks" / "t.py"
    late = "\n\ndef late(root):\n    import torch\n\n    from pipeline_lib import b\n\n    return b, torch\n"
    t.write_text(PROJECT["tasks/t.py"] + late)
    parts = _parts(project, "late")
    assert {"code.pipeline_lib.b", "lib.torch"} <= set(parts), sorted(parts)


def test_producer_digest_is_remembered_until_a_file_it_read_changes(project: Path) -> None:
    import importlib
    import sys

    sys.path.insert(0, str(project))
    saved = {name: sys.modules.pop(name) for name in list(sys.modules) if name.split(".")[0] == "pipeline_lib"}
    try:
        f = importlib.import_module("pipeline_lib.a").f
        first = producer_digest(f, root=project)
        assert first == producer_digest(f, index=CodeIndex(project)), "remembered or not, the same digest"
        b = project / "pipeline_lib" / "b.py"
        b.write_text("def g():\n    return 22\n", encoding="utf-8")  # another size: a new stamp even within a tick
        assert producer_digest(f, root=project) != first, "a remembered digest outlived a change of its code"
        assert producer_digest(f, root=project) == producer_digest(f, index=CodeIndex(project))
        (project / "pipeline_lib" / "c.py").write_text("X = 22\n", encoding="utf-8")
        with pytest.raises(CacheKeyError, match="is not under"):
            producer_digest(len, root=project)
    finally:
        sys.path.remove(str(project))
        for name in [n for n in sys.modules if n.split(".")[0] == "pipeline_lib"]:
            del sys.modules[name]
        sys.modules.update(saved)


def _plant(record: Path, value: str) -> None:
    """Replace every remembered code.task part by value: a later index that takes the record answers it."""
    data = json.loads(record.read_text(encoding="utf-8"))
    for entry in data["tasks"].values():
        entry["parts"]["code.task"] = value
    record.write_text(json.dumps(data), encoding="utf-8")


def test_remembered_parts_are_taken_until_a_file_they_came_from_changes(project: Path, tmp_path: Path) -> None:
    record = tmp_path / "code-parts.json"
    fresh = _parts(project)
    assert CodeIndex(project, remembered=record).task_parts("tasks.t", "stage") == fresh, "remembering changed parts"
    _plant(record, "planted")
    assert CodeIndex(project, remembered=record).task_parts("tasks.t", "stage")["code.task"] == "planted", (
        "the remembered parts were not taken although no file changed"
    )
    (project / "pipeline_lib" / "b.py").write_text("def g():\n    return 22\n", encoding="utf-8")
    changed = CodeIndex(project, remembered=record).task_parts("tasks.t", "stage")
    assert changed == _parts(project) and changed["code.pipeline_lib.b"] != fresh["code.pipeline_lib.b"], (
        "remembered parts outlived a change of a module the task reaches"
    )


@pytest.mark.parametrize("change", ["module_added", "deriver_changed", "damaged"])
def test_remembered_parts_are_derived_again(
    project: Path, tmp_path: Path, change: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    record = tmp_path / "code-parts.json"
    deriver = tmp_path / "deriver.py"
    deriver.write_text("# the deriving code\n", encoding="utf-8")
    monkeypatch.setattr("pipeline_lib.core.code_index.DERIVER", deriver)
    fresh = CodeIndex(project, remembered=record).task_parts("tasks.t", "stage")
    _plant(record, "planted")
    if change == "module_added":  # a new module where the task's imports look may change what they resolve to
        (project / "tasks" / "new.py").write_text("X = 1\n", encoding="utf-8")
    elif change == "deriver_changed":
        deriver.write_text("# the deriving code, changed\n", encoding="utf-8")
    else:
        record.write_text('{"format": 1, "tasks": ', encoding="utf-8")
    assert CodeIndex(project, remembered=record).task_parts("tasks.t", "stage") == fresh, f"{change}: not derived again"
