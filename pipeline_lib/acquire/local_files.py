"""A user's folder read without ever leaving it: every entry listed (symlinks left out with their reason, unless
following them is asked and they point inside the folder), and files opened one path component at a time from the
folder's own descriptor with O_NOFOLLOW, so that a symlink swapped in between listing and reading fails the read
instead of reading another file."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

SYMLINK = "symlink"  # left out: symlinks are followed only with --follow-symlinks / follow_symlinks: true
SYMLINK_OUTSIDE = "symlink outside the folder"
SYMLINK_BROKEN = "broken symlink"
SYMLINK_LOOP = "symlink loop"
NOT_REGULAR = "not a regular file"  # a FIFO, socket or device
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0)


@dataclass(frozen=True)
class FolderEntry:
    """One non-hidden entry of a folder: where it is listed (path), the file to read (target, relative to the
    folder's real path; the path itself unless it is a followed symlink) and why it is left out ("" when taken)."""

    path: Path
    target: PurePosixPath
    reason: str = ""


def folder_entries(root: Path, follow_symlinks: bool = False) -> Iterator[FolderEntry]:
    """Every entry under root that is not hidden (no part of its path starts with '.'), sorted, recursive.

    Regular files are taken. A symlink (to a file or a folder) is left out as `symlink`; with follow_symlinks one
    that resolves inside root is followed (a folder is walked under the link's name), others are left out as
    `symlink outside the folder`, `broken symlink` or `symlink loop`. FIFOs, sockets and devices: `not a regular file`.
    """
    walker = _Walker(Path(root), Path(os.path.realpath(root)), follow_symlinks)
    yield from walker.walk(PurePosixPath(), PurePosixPath(), frozenset())


@dataclass(frozen=True)
class _Walker:
    root: Path  # as the user named it: listed paths start with it
    real: Path  # its real path: what "inside" means
    follow: bool

    def walk(
        self, listed: PurePosixPath, real: PurePosixPath, above: frozenset[PurePosixPath]
    ) -> Iterator[FolderEntry]:
        """The entries of the folder at real (relative to self.real), listed under listed."""
        try:
            with _opened_dir(self.real, real) as fd, os.scandir(fd) as found:
                entries = sorted((entry.name, _kind(entry)) for entry in found if not entry.name.startswith("."))
        except OSError:  # the folder went away or was swapped for a symlink while we walked: nothing to list
            return
        for name, kind in entries:
            path = listed / name
            if kind == "dir":
                yield from self.walk(path, real / name, above | {real})
            elif kind == "symlink":
                yield from self._symlink(path, real / name, above | {real})
            else:
                yield FolderEntry(self.root / path, real / name, "" if kind == "file" else NOT_REGULAR)

    def _symlink(
        self, listed: PurePosixPath, link: PurePosixPath, above: frozenset[PurePosixPath]
    ) -> Iterator[FolderEntry]:
        if not self.follow:
            yield FolderEntry(self.root / listed, link, SYMLINK)
            return
        resolved = Path(os.path.realpath(self.real / link))
        if not resolved.is_relative_to(self.real):
            yield FolderEntry(self.root / listed, link, SYMLINK_OUTSIDE)
            return
        inside = PurePosixPath(resolved.relative_to(self.real).as_posix())
        if resolved.is_dir():
            if any(inside == earlier or inside in earlier.parents for earlier in above):  # a folder being walked
                yield FolderEntry(self.root / listed, link, SYMLINK_LOOP)
            else:
                yield from self.walk(listed, inside, above)
        elif resolved.is_file():
            yield FolderEntry(self.root / listed, inside)
        else:
            reason = SYMLINK_BROKEN if not resolved.exists() else NOT_REGULAR
            yield FolderEntry(self.root / listed, link, reason)


def _kind(entry: os.DirEntry[str]) -> str:
    """symlink, dir, file or other, without following a symlink."""
    if entry.is_symlink():
        return "symlink"
    if entry.is_dir(follow_symlinks=False):
        return "dir"
    return "file" if entry.is_file(follow_symlinks=False) else "other"


@contextlib.contextmanager
def _opened_dir(root: Path, relative: PurePosixPath) -> Iterator[int]:
    """A descriptor of the folder root/relative reached without following a symlink below root; closed on exit."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    try:
        for part in relative.parts:
            child = _open_at(part, _DIR_FLAGS, fd)
            os.close(fd)
            fd = child
        yield fd
    finally:
        os.close(fd)


def _open_at(name: str, flags: int, dir_fd: int) -> int:
    """os.open relative to dir_fd; a symlink where none may be gives OSError saying so."""
    try:
        return os.open(name, flags, dir_fd=dir_fd)
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
            raise OSError(error.errno, f"{name} is a symlink (or was replaced by one) and is not followed") from None
        raise


def open_inside(root: Path, target: PurePosixPath) -> BinaryIO:
    """The regular file root/target opened for reading, every component below root reached with O_NOFOLLOW.

    OSError when a component is (or became) a symlink, or the file is not a regular file: nothing outside root is
    ever opened, whatever is swapped in between listing and reading.
    """
    if not target.parts:
        raise IsADirectoryError(f"{root} is the folder itself, not a file in it")
    with _opened_dir(Path(os.path.realpath(root)), target.parent) as parent:
        fd = _open_at(target.name, _FILE_FLAGS, parent)
    handle = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        handle.close()
        raise OSError(errno.EINVAL, f"{target} is not a regular file")
    os.set_blocking(fd, True)
    return handle


def read_inside(root: Path, target: PurePosixPath) -> bytes:
    """The bytes of the regular file root/target (see open_inside)."""
    with open_inside(root, target) as handle:
        return handle.read()
