"""Reading a user's folder without leaving it: symlinks listed with their reason (followed only inside the folder,
when asked), and a file opened component by component, so a symlink swapped in after the listing fails the read."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

import pytest

from pipeline_lib.acquire.local_files import (
    NOT_REGULAR,
    SYMLINK,
    SYMLINK_BROKEN,
    SYMLINK_LOOP,
    SYMLINK_OUTSIDE,
    folder_entries,
    open_inside,
    read_inside,
)
from tests.conftest import make_image


def _folder(root: Path, outside: Path) -> Path:
    make_image(root / "a.png", seed=1, fmt="PNG")
    make_image(root / "sub" / "b.png", seed=2, fmt="PNG")
    make_image(root / ".hidden" / "c.png", seed=3, fmt="PNG")
    (root / "inside.png").symlink_to("a.png")
    (root / "alias").symlink_to("sub", target_is_directory=True)
    (root / "shadow.png").symlink_to(outside)
    (root / "away").symlink_to(outside.parent, target_is_directory=True)
    (root / "gone.png").symlink_to(root / "nothing.png")
    (root / "sub" / "up").symlink_to("..", target_is_directory=True)
    os.mkfifo(root / "pipe")
    return root


def _reasons(root: Path, follow: bool) -> dict[str, tuple[str, str]]:
    return {
        entry.path.relative_to(root).as_posix(): (entry.target.as_posix(), entry.reason)
        for entry in folder_entries(root, follow)
    }


def test_symlinks_are_left_out_unless_followed_and_inside(tmp_path: Path, outside_secret: Path) -> None:
    root = _folder(tmp_path / "imgs", outside_secret)
    assert _reasons(root, follow=False) == {
        "a.png": ("a.png", ""),
        "alias": ("alias", SYMLINK),
        "away": ("away", SYMLINK),
        "gone.png": ("gone.png", SYMLINK),
        "inside.png": ("inside.png", SYMLINK),
        "pipe": ("pipe", NOT_REGULAR),
        "shadow.png": ("shadow.png", SYMLINK),
        "sub/b.png": ("sub/b.png", ""),
        "sub/up": ("sub/up", SYMLINK),
    }, "every symlink, to a file or a folder, inside or out, is left out by default"
    assert _reasons(root, follow=True) == {
        "a.png": ("a.png", ""),
        "alias/b.png": ("sub/b.png", ""),  # listed under the link's name, read from its target
        "alias/up": ("sub/up", SYMLINK_LOOP),
        "away": ("away", SYMLINK_OUTSIDE),
        "gone.png": ("gone.png", SYMLINK_BROKEN),
        "inside.png": ("a.png", ""),
        "pipe": ("pipe", NOT_REGULAR),
        "shadow.png": ("shadow.png", SYMLINK_OUTSIDE),
        "sub/b.png": ("sub/b.png", ""),
        "sub/up": ("sub/up", SYMLINK_LOOP),
    }, "followed: only targets inside the folder, and a link back up is not walked again"


def test_a_folder_given_through_a_symlink_is_read_as_named(tmp_path: Path) -> None:
    make_image(tmp_path / "real" / "a.png", seed=1, fmt="PNG")
    (tmp_path / "named").symlink_to(tmp_path / "real", target_is_directory=True)
    entries = list(folder_entries(tmp_path / "named"))
    assert [(e.path, e.reason) for e in entries] == [(tmp_path / "named" / "a.png", "")]
    assert read_inside(tmp_path / "named", entries[0].target) == (tmp_path / "real" / "a.png").read_bytes()


def test_a_symlink_swapped_in_after_the_listing_is_not_read(tmp_path: Path, outside_secret: Path) -> None:
    root = tmp_path / "imgs"
    make_image(root / "a.png", seed=1, fmt="PNG")
    make_image(root / "sub" / "b.png", seed=2, fmt="PNG")
    listed = {entry.target: entry for entry in folder_entries(root)}
    assert set(listed) == {PurePosixPath("a.png"), PurePosixPath("sub/b.png")}
    (root / "a.png").unlink()
    (root / "a.png").symlink_to(outside_secret)  # the file itself swapped
    with pytest.raises(OSError, match="symlink"):
        read_inside(root, PurePosixPath("a.png"))
    (root / "sub").rename(root / "sub-moved")
    (root / "sub").symlink_to(outside_secret.parent, target_is_directory=True)  # a folder above it swapped
    (outside_secret.parent / "b.png").write_bytes(outside_secret.read_bytes())
    with pytest.raises(OSError, match="symlink"):
        read_inside(root, PurePosixPath("sub/b.png"))


def test_only_regular_files_are_opened(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    root.mkdir()
    os.mkfifo(root / "pipe")  # opening it for reading would wait for a writer forever without O_NONBLOCK
    with pytest.raises(OSError, match="not a regular file"):
        open_inside(root, PurePosixPath("pipe"))
    with pytest.raises(IsADirectoryError):
        open_inside(root, PurePosixPath())
