"""The initial weights check remembered in the workspace (learn/initial_weights.py)."""

from __future__ import annotations

import os
from pathlib import Path

from pipeline_lib.core.workspace import Workspace
from pipeline_lib.learn.initial_weights import checked_weights, record_path, remember


class Check:
    """A check that finds answer (a file or None) and counts its calls."""

    def __init__(self, answer: Path | None) -> None:
        self.answer = answer
        self.calls = 0

    def __call__(self) -> Path | None:
        self.calls += 1
        return self.answer


def test_a_check_is_remembered_until_its_file_changes(tmp_path: Path) -> None:
    workspace = Workspace.create(tmp_path / "ws")
    weights = tmp_path / "resnet18.pth"
    weights.write_bytes(b"weights")
    check = Check(weights)
    question = ("resnet18", "imagenet", "")
    assert checked_weights(workspace, question, check) == weights
    assert checked_weights(workspace, question, check) == weights and check.calls == 1, "not remembered"
    assert record_path(workspace).is_file()
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert checked_weights(workspace, question, check) == weights and check.calls == 2, "a touched file not rechecked"
    weights.unlink()
    check.answer = None
    assert checked_weights(workspace, question, check) is None and check.calls == 3, "a removed file not rechecked"


def test_another_question_or_no_workspace_checks_again(tmp_path: Path, monkeypatch) -> None:
    workspace = Workspace.create(tmp_path / "ws")
    check = Check(None)
    assert checked_weights(workspace, ("resnet18", "none", ""), check) is None
    assert checked_weights(workspace, ("resnet18", "none", ""), check) is None and check.calls == 1, "None forgotten"
    checked_weights(workspace, ("resnet50", "none", ""), check)
    assert check.calls == 2, "another model took the answer of the first"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "elsewhere"))
    checked_weights(workspace, ("resnet18", "none", ""), check)
    assert check.calls == 3, "another TORCH_HOME took the answer of the first"
    checked_weights(None, ("resnet18", "none", ""), check)
    checked_weights(None, ("resnet18", "none", ""), check)
    assert check.calls == 5, "without a workspace every call checks"


def test_an_unreadable_record_is_checked_again(tmp_path: Path) -> None:
    workspace = Workspace.create(tmp_path / "ws")
    record_path(workspace).write_text("{not json", encoding="utf-8")
    check = Check(None)
    assert checked_weights(workspace, ("resnet18", "none", ""), check) is None and check.calls == 1
    assert checked_weights(workspace, ("resnet18", "none", ""), check) is None and check.calls == 1


def test_a_check_made_before_the_workspace_existed_is_remembered(tmp_path: Path) -> None:
    weights = tmp_path / "resnet18.pth"
    weights.write_bytes(b"weights")
    check = Check(weights)
    question = ("resnet18", "imagenet", "")
    found = checked_weights(None, question, check)
    workspace = Workspace.create(tmp_path / "ws")
    remember(workspace, question, found)
    assert checked_weights(workspace, question, check) == weights and check.calls == 1, "the first check forgotten"
