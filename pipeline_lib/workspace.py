"""The workspace: one directory holding everything a run produces, with atomic writes."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

_SUBDIRS = (
    "store",
    "incoming",
    "quarantine",
    "catalog",
    "crawl",
    "review",
    "splits",
    "cache",
    "models",
    "reports",
    "prefect",
)


class WorkspaceError(FileNotFoundError):
    """The workspace directory is missing or not an aidetect workspace."""


@dataclass(frozen=True)
class Ref:
    """A small, content-aware reference to a file in the workspace (path relative to its root)."""

    path: str
    digest: str

    def resolve(self, workspace: Workspace) -> Path:
        """Absolute path of the referenced file."""
        return workspace.root / self.path


@dataclass(frozen=True)
class Workspace:
    """Paths of one workspace; every stage writes below root."""

    root: Path

    @classmethod
    def create(cls, root: Path | str) -> Workspace:
        """Create (or reuse) a workspace at root with all its sub-directories."""
        path = Path(root).expanduser().resolve()
        for name in _SUBDIRS:
            (path / name).mkdir(parents=True, exist_ok=True)
        marker = path / ".aidetect-workspace"
        if not marker.exists():
            marker.write_text("aidetect workspace v1\n", encoding="utf-8")
        return cls(path)

    @classmethod
    def open(cls, root: Path | str) -> Workspace:
        """Open an existing workspace; raise WorkspaceError naming the path if there is none."""
        path = Path(root).expanduser().resolve()
        if not (path / ".aidetect-workspace").is_file():
            raise WorkspaceError(
                f"no aidetect workspace at {path} (run `aidetect run` or `aidetect demo` first, "
                "or pass --workspace DIR)"
            )
        return cls(path)

    @property
    def store(self) -> Path:
        return self.root / "store"

    @property
    def incoming(self) -> Path:
        return self.root / "incoming"

    @property
    def quarantine(self) -> Path:
        return self.root / "quarantine"

    @property
    def catalog(self) -> Path:
        return self.root / "catalog"

    @property
    def crawl(self) -> Path:
        return self.root / "crawl"

    @property
    def review(self) -> Path:
        return self.root / "review"

    @property
    def splits(self) -> Path:
        return self.root / "splits"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def prefect(self) -> Path:
        return self.root / "prefect"

    def relative(self, path: Path) -> str:
        """Path relative to the workspace root, as stored in references and the catalog."""
        return Path(path).resolve().relative_to(self.root).as_posix()

    def ref(self, path: Path) -> Ref:
        """A Ref to an existing file, with its sha256 as digest."""
        return Ref(self.relative(path), file_sha256(path))

    def store_path(self, sha256: str, ext: str) -> Path:
        """Content-addressed location of an original: store/ab/<sha256>.<ext>."""
        return self.root / "store" / sha256[:2] / f"{sha256}.{ext}"


def bytes_sha256(data: bytes) -> str:
    """Hex sha256 of a byte string."""
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path next to target; rename it onto target only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(target: Path, data: bytes, durable: bool = True) -> Path:
    """Write data to target atomically (no partial file is ever visible at target).

    durable: fsync the data before the rename. Without it the caller makes a batch durable later (sync_files).
    """
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
    return Path(target)


def _fsync(path: Path) -> bool:
    """fsync a file or folder; False if it is gone."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    return True


def sync_files(paths: Iterable[Path], threads: int = 16) -> int:
    """fsync each file, then each distinct folder holding them (their new names), `threads` at a time; return the
    number of folders.

    Makes a batch of atomic_write_bytes(..., durable=False) writes durable: after a crash each file is whole or
    absent once this returned. Files that vanished since (moved on by a later stage) are skipped. Concurrent
    fsyncs share the filesystem's journal commits: far faster than one after the other.
    """
    files = [Path(path) for path in paths]
    if not files:
        return 0
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(files)))) as pool:
        present = [path for path, found in zip(files, pool.map(_fsync, files), strict=True) if found]
        folders = sorted({path.parent for path in present})
        if os.name == "posix":  # a folder cannot be opened for fsync elsewhere
            list(pool.map(_fsync, folders))
    return len(folders)


def atomic_write_text(target: Path, text: str) -> Path:
    """Write UTF-8 text to target atomically."""
    return atomic_write_bytes(target, text.encode("utf-8"))


def put_in_store(workspace: Workspace, data: bytes, ext: str) -> tuple[str, Path]:
    """Store bytes content-addressed (idempotent); return (sha256, path)."""
    sha256 = bytes_sha256(data)
    target = workspace.store_path(sha256, ext)
    if not target.exists():
        atomic_write_bytes(target, data)
    return sha256, target


def digest_of(*parts: str) -> str:
    """A short stable digest of strings (for keys built from several digests and params)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()


def listing_digest(folders: list[Path]) -> str:
    """Digest of the names, sizes and mtimes of every file under the folders (cheap change detection)."""
    digest = hashlib.sha256()
    for folder in folders:
        folder = Path(folder)
        digest.update(str(folder).encode("utf-8"))
        if not folder.is_dir():
            continue
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            stat = path.stat()
            digest.update(f"{path.relative_to(folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def folder_files(root: Path) -> Iterator[Path]:
    """Every file under root that is not hidden (no part of its path starts with '.'), sorted, recursive."""
    for path in sorted(root.rglob("*")):
        parts = path.relative_to(root).parts
        if not any(part.startswith(".") for part in parts) and path.is_file():
            yield path
