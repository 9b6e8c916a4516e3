"""Whether a path can hold a workspace: a folder, its sub-folders folders, a marker naming a layout this code knows,
writable. Checked when a workspace is opened, so a wrong path fails in one line before any stage runs."""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterable
from pathlib import Path

MARKER_FILE = ".aidetect-workspace"
LAYOUT_VERSION = 1  # the layout of the folders and files this code reads and writes; the marker names it
_MARKER = re.compile(r"aidetect workspace v(\d+)")
_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


class UnusableWorkspaceError(RuntimeError):
    """The workspace path cannot be used as it is (a file, a file where a folder belongs, not writable, a layout
    version this code does not know); the message names the path and what to do."""


def marker_text(version: int = LAYOUT_VERSION) -> str:
    """The marker file's content for a layout version."""
    return f"aidetect workspace v{version}\n"


def check_root(root: Path, folders: Iterable[str]) -> None:
    """UnusableWorkspaceError when root or one of its parents is a file, or one of its folders is a file; a path
    that does not exist yet is fine (creating the workspace makes it)."""
    for path in (root, *root.parents):
        if path.exists():
            if not path.is_dir():
                where = "" if path == root else f" (in the workspace path {root})"
                raise UnusableWorkspaceError(
                    f"{path} is a file, not a folder{where}: pass --workspace a folder (new or existing)"
                )
            break
    for name in folders:
        folder = root / name
        if folder.exists() and not folder.is_dir():
            raise UnusableWorkspaceError(
                f"{folder} is a file where the workspace keeps its {name}/ folder: move it aside "
                f"(e.g. mv {folder} {folder}.moved) and run again"
            )


def check_creatable(root: Path) -> None:
    """UnusableWorkspaceError when no workspace can be made at root (which does not exist yet): the folder that
    would hold it refuses writes (a read-only file system, no permission)."""
    parent = next(path for path in root.parents if path.exists())
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UnusableWorkspaceError(
            f"cannot make workspace {root}: {parent} is not writable; pass --workspace a folder where you can write"
        )


def layout_version(marker: Path) -> int:
    """The layout version a marker file names; UnusableWorkspaceError if it names none or one this code cannot use.

    Version 1 is the first layout; a newer one was written by a newer aidetect and is refused rather than guessed at.
    """
    text = marker.read_bytes().decode("utf-8", errors="replace").strip()
    found = _MARKER.fullmatch(text)
    if found is None:
        raise UnusableWorkspaceError(
            f"{marker} does not name a workspace layout (it reads {text[:40]!r}, aidetect writes "
            f"{marker_text().strip()!r}): if this folder is an aidetect workspace, write that line back into it"
        )
    version = int(found[1])
    if version > LAYOUT_VERSION:
        raise UnusableWorkspaceError(
            f"workspace {marker.parent} has layout v{version}, newer than this aidetect understands "
            f"(v{LAYOUT_VERSION}): use the aidetect version that wrote it, or a new --workspace"
        )
    if version < 1:
        raise UnusableWorkspaceError(
            f"{marker} names layout v{version}, which no aidetect wrote (the first layout is v1): "
            f"write {marker_text().strip()!r} back into it if this folder is an aidetect workspace"
        )
    return version


def not_writable(root: Path, error: OSError) -> OSError | UnusableWorkspaceError:
    """The error to raise for an OSError met while writing into the workspace: one naming the workspace when the
    file system refused the write (read-only, no permission), else the error itself."""
    if error.errno not in _NOT_WRITABLE:
        return error
    return UnusableWorkspaceError(
        f"workspace {root} is not writable ({error.strerror}: {error.filename}): aidetect writes into its workspace; "
        "make it writable, or copy it to a writable place and pass --workspace there"
    )
