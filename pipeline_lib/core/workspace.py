"""The workspace: one directory holding everything a run produces, with atomic writes."""

from __future__ import annotations

import contextlib
import contextvars
import fcntl
import hashlib
import json
import logging
import os
import socket
import tempfile
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from pipeline_lib.core.diskspace import disk_full
from pipeline_lib.core.layout import MARKER_FILE, check_root, layout_version, marker_text, not_writable

log = logging.getLogger(__name__)

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


LOCK_FILE = ".aidetect.lock"
_UMASK_LOCK = threading.Lock()
# The workspaces whose lock this command holds (a context variable: a flow run inside the command inherits it, a
# second thread started apart does not).
_HELD_LOCKS: contextvars.ContextVar[tuple[Path, ...]] = contextvars.ContextVar("aidetect_workspace_locks", default=())


class WorkspaceError(FileNotFoundError):
    """The workspace directory is missing or not an aidetect workspace."""


class WorkspaceBusyError(RuntimeError):
    """Another process writes to this workspace (it holds the workspace lock); the message names it."""


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
        """Create (or reuse) a workspace at root with all its sub-directories.

        Raises UnusableWorkspaceError (one line) when root is a file, holds a file where a folder belongs, names an
        unknown layout version or cannot be written.
        """
        path = Path(root).expanduser().resolve()
        check_root(path, _SUBDIRS)
        marker = path / MARKER_FILE
        if marker.is_file():
            layout_version(marker)
        try:
            for name in _SUBDIRS:
                (path / name).mkdir(parents=True, exist_ok=True)
            if not marker.exists():
                marker.write_text(marker_text(), encoding="utf-8")
        except OSError as error:
            raise not_writable(path, error) from error
        return cls(path)

    @classmethod
    def open(cls, root: Path | str) -> Workspace:
        """Open an existing workspace; raise WorkspaceError naming the path if there is none, UnusableWorkspaceError
        if it is a file, holds a file where a folder belongs or names an unknown layout version."""
        path = Path(root).expanduser().resolve()
        check_root(path, _SUBDIRS)
        marker = path / MARKER_FILE
        if not marker.is_file():
            raise WorkspaceError(
                f"no aidetect workspace at {path} (run `aidetect run` or `aidetect demo` first, "
                "or pass --workspace DIR)"
            )
        layout_version(marker)
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


def current_umask() -> int:
    """The process's umask (read from /proc where possible, since os.umask can only be read by setting it)."""
    try:
        for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode a plain open() would give a new file: 0o666 less the umask (mkstemp alone gives 0o600)."""
    return 0o666 & ~current_umask()


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path next to target; rename it onto target only if the block succeeds.

    The file gets the mode of a plain open() under the user's umask, so a team sharing a workspace can read it.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    try:
        os.fchmod(fd, default_file_mode())
    finally:
        os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, target)
    except Exception as error:
        full = disk_full(error, target)  # measured before the partial file goes, as the write that failed saw it
        if full is None:
            raise
        raise full from error
    finally:
        tmp.unlink(missing_ok=True)


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
    """Store bytes content-addressed (idempotent; a damaged copy already there is rewritten); return (sha256, path)."""
    sha256 = bytes_sha256(data)
    target = workspace.store_path(sha256, ext)
    if not has_content(target, sha256):
        atomic_write_bytes(target, data)
    return sha256, target


def has_content(path: Path, sha256: str) -> bool:
    """Whether path is a file whose bytes hash to sha256 (a truncated or replaced file does not)."""
    if not Path(path).is_file():
        return False
    if file_sha256(path) == sha256:
        return True
    log.warning("%s does not hold the bytes its name promises (%s...): rewriting it", path, sha256[:12])
    return False


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


# ---------------------------------------------------------------------------------------------------------------
# One workspace, one writer


@dataclass(frozen=True)
class LockHolder:
    """Who holds (or held) the workspace lock."""

    pid: int
    host: str
    since: str
    command: str = ""

    def describe(self) -> str:
        """'pid 123 on host h since 2026-...: aidetect run'."""
        what = f": {self.command}" if self.command else ""
        return f"pid {self.pid} on host {self.host} since {self.since}{what}"

    def is_alive(self) -> bool | None:
        """Whether the holder's process still runs (None when it runs on another host: unknown)."""
        if self.host != socket.gethostname():
            return None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def lock_path(workspace: Workspace) -> Path:
    """The workspace's lock file."""
    return workspace.root / LOCK_FILE


def read_lock_holder(path: Path) -> LockHolder | None:
    """The holder recorded in a lock file, or None when it is empty or unreadable."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8") or "null")
        return LockHolder(int(data["pid"]), str(data["host"]), str(data["since"]), str(data.get("command", "")))
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _busy_message(workspace: Workspace, holder: LockHolder | None) -> str:
    who = holder.describe() if holder is not None else "another process"
    return (
        f"workspace {workspace.root} is in use by {who} (lock file {lock_path(workspace)}); "
        "wait for that run to finish or stop it, then run again. One workspace takes one writer at a time"
    )


def _try_lock(workspace: Workspace) -> int:
    """An open descriptor holding the exclusive lock; WorkspaceBusyError naming the holder if it is taken,
    UnusableWorkspaceError if the workspace cannot be written."""
    path = lock_path(workspace)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, default_file_mode())
    except OSError as error:
        raise not_writable(workspace.root, error) from error
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise WorkspaceBusyError(_busy_message(workspace, read_lock_holder(path))) from None
    return fd


def check_unlocked(workspace: Workspace) -> None:
    """Raise WorkspaceBusyError now if another process holds the workspace lock (a quick check before starting)."""
    if not lock_path(workspace).exists():
        return
    fd = _try_lock(workspace)
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


@contextlib.contextmanager
def workspace_lock(workspace: Workspace, command: str = "") -> Iterator[LockHolder | None]:
    """Hold the workspace's writer lock for the block; yield the stale holder taken over (a killed run) or None.

    The lock is an flock on .aidetect.lock, so the kernel releases it when its process dies, whatever the way; the
    file records pid, host, start time and command so that a second run can say who holds it. Taking it again
    where it is held already (a flow run inside the command that took it) is a no-op: the outer block keeps it.
    """
    if workspace.root in _HELD_LOCKS.get():
        yield None
        return
    fd = _try_lock(workspace)
    path = lock_path(workspace)
    stale = read_lock_holder(path)
    if stale is not None:
        log.warning("taking over the workspace lock left by %s (that process is gone)", stale.describe())
    me = LockHolder(os.getpid(), socket.gethostname(), datetime.now(UTC).isoformat(timespec="seconds"), command)
    held = _HELD_LOCKS.set((*_HELD_LOCKS.get(), workspace.root))
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(asdict(me)).encode("utf-8"), 0)
        os.fsync(fd)
        yield stale
    finally:
        _HELD_LOCKS.reset(held)
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
