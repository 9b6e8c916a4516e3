"""The code part of stage keys (pipeline_lib.core.code_index) on a small project tree made in tmp_path (real files,
real parsing), and on the real stages."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pipeline_lib.core.cachekey import StageKey, changed_parts
from pipeline_lib.core.code_index import CacheKeyError, CodeIndex

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
