"""Whether a path can hold a workspace: files where folders belong, the marker's layout version, writability."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline_lib.core.layout import (
    LAYOUT_VERSION,
    UnusableWorkspaceError,
    check_creatable,
    check_root,
    layout_version,
    marker_text,
    not_writable,
)


def test_a_file_as_the_workspace_or_above_it_is_named(tmp_path: Path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder", encoding="utf-8")
    with pytest.raises(UnusableWorkspaceError, match=f"{a_file} is a file, not a folder: pass --workspace"):
        check_root(a_file, ["cache"])
    with pytest.raises(UnusableWorkspaceError, match=f"{a_file} is a file, not a folder \\(in the workspace path"):
        check_root(a_file / "ws", ["cache"])
    check_root(tmp_path / "new" / "ws", ["cache"])  # nothing there yet: creating it makes it


def test_a_file_where_a_folder_of_the_layout_belongs_is_named_with_what_to_do(tmp_path: Path):
    (tmp_path / "store").mkdir()
    (tmp_path / "cache").write_bytes(b"")
    with pytest.raises(UnusableWorkspaceError) as info:
        check_root(tmp_path, ["store", "cache"])
    assert f"{tmp_path / 'cache'} is a file where the workspace keeps its cache/ folder" in str(info.value)
    assert "move it aside" in str(info.value)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("aidetect workspace v99\n", ["layout v99", f"newer than this aidetect understands (v{LAYOUT_VERSION})"]),
        ("aidetect workspace v0\n", ["layout v0", "no aidetect wrote"]),
        ("hello\n", ["does not name a workspace layout", "'hello'", "'aidetect workspace v1'"]),
        ("", ["does not name a workspace layout"]),
    ],
)
def test_a_marker_naming_an_unknown_layout_is_refused(tmp_path: Path, text: str, words: list[str]):
    marker = tmp_path / ".aidetect-workspace"
    marker.write_text(text, encoding="utf-8")
    with pytest.raises(UnusableWorkspaceError) as info:
        layout_version(marker)
    assert all(word in str(info.value) for word in words), (words, str(info.value))


def test_the_marker_written_today_names_the_current_layout(tmp_path: Path):
    marker = tmp_path / ".aidetect-workspace"
    marker.write_text(marker_text(), encoding="utf-8")
    assert layout_version(marker) == LAYOUT_VERSION == 1


def test_other_os_errors_are_left_as_they_are(tmp_path: Path):
    with pytest.raises(FileExistsError) as info:
        os.mkdir(tmp_path)  # a real error that is not about permissions
    assert not_writable(tmp_path, info.value) is info.value


def test_a_new_workspace_in_a_writable_folder_can_be_made(tmp_path: Path):
    check_creatable(tmp_path / "a" / "b" / "ws")  # the nearest folder that exists is tmp_path: writable
