"""Files of the crawl log that the workspace no longer holds (deleted by hand, a lost disk) or holds truncated:
fetched again from their source when it still has the same bytes, and reported loudly when it does not."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pandas as pd
import requests

from pipeline_lib.acquire.crawl_state import files_under
from pipeline_lib.acquire.fetch import fetch_bytes
from pipeline_lib.acquire.ingest import recorded_check
from pipeline_lib.core.config import SourcesConfig
from pipeline_lib.core.workspace import Workspace, atomic_write_bytes, bytes_sha256

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Lost:
    """A file the workspace lost and could not get back: its sha256, where it came from, and why."""

    sha256: str
    url: str
    reason: str


@dataclass(frozen=True)
class Recovery:
    """What restore_missing did: sha256s put back (and where), and those that stay lost."""

    restored: dict[str, str] = field(default_factory=dict)  # sha256 -> path relative to the workspace
    lost: list[Lost] = field(default_factory=list)

    def notes(self) -> list[str]:
        """One line per outcome, for the stage's notes."""
        lines = []
        if self.restored:
            lines.append(f"{len(self.restored)} missing file(s) fetched again from their source and put back")
        for item in self.lost:
            lines.append(f"LOST: {item.sha256[:12]} from {item.url} is gone from the workspace: {item.reason}")
        return lines


def _held_files(folder: Path, nested: bool) -> Iterator[tuple[str, Path, int]]:
    """(sha256 part of the name, path, size) of every file under folder (one level of sub-folders when nested)."""
    for entry in files_under(folder, nested):
        if not entry.name.startswith("."):
            yield entry.name.split(".", 1)[0], Path(entry.path), entry.stat().st_size


def held_files(workspace: Workspace) -> dict[str, tuple[Path, int]]:
    """sha256 -> (a file holding it, its size), from store/, quarantine/ and incoming/ (one listing of each)."""
    found: dict[str, tuple[Path, int]] = {}
    for folder, nested in ((workspace.store, True), (workspace.quarantine, False), (workspace.incoming, True)):
        for sha256, path, size in _held_files(folder, nested):
            found.setdefault(sha256, (path, size))
    return found


def missing_files(workspace: Workspace, crawl_log: pd.DataFrame) -> dict[str, list[tuple[str, str]]]:
    """sha256 -> its (url, ext) rows, for every file the log says was fetched that the workspace no longer holds,
    or holds with another size than was fetched (truncated: a crash, a full disk)."""
    fetched = crawl_log[crawl_log["sha256"].fillna("").astype(str) != ""]
    held = held_files(workspace)
    missing: dict[str, list[tuple[str, str]]] = {}
    rows = zip(fetched["sha256"], fetched["url"], fetched["ext"], fetched["n_bytes"], strict=True)
    for sha256, url, ext, n_bytes in rows:
        found = held.get(str(sha256))
        if found is None or found[1] != int(n_bytes):
            missing.setdefault(str(sha256), []).append((str(url), str(ext).lstrip(".")))
    return missing


def _place_for(workspace: Workspace, sha256: str, ext: str) -> Path:
    """Where a file belongs: where ingest put it (store/ or quarantine/, by its validation record), else incoming/."""
    check = recorded_check(workspace, sha256)
    if check is None:
        return workspace.incoming / sha256[:2] / f"{sha256}.{ext}"
    return workspace.store_path(sha256, ext) if check.ok else workspace.quarantine / f"{sha256}.{ext}"


def _from_source(url: str, sources: SourcesConfig, session: requests.Session) -> tuple[bytes | None, str]:
    """The bytes at url now: a local file (file://) or a download (checked and pinned like any crawl fetch)."""
    parts = urlsplit(url)
    if parts.scheme == "file":
        path = Path(unquote(parts.path))
        if not path.is_file():
            return None, f"the source file {path} is gone too"
        return path.read_bytes(), ""
    return fetch_bytes(session, url, sources)


def _set_aside(workspace: Workspace, path: Path) -> None:
    """Move a damaged file into damaged/ (same relative path), never delete it."""
    target = workspace.root / "damaged" / workspace.relative(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(path, target)


def restore_missing(workspace: Workspace, crawl_log: pd.DataFrame, sources: SourcesConfig) -> Recovery:
    """Fetch every missing file again from its source(s) and put it back where it belongs, if the bytes still
    have its sha256; the others are logged as warnings (LOST) and returned."""
    missing = missing_files(workspace, crawl_log)
    held = held_files(workspace) if missing else {}
    restored: dict[str, str] = {}
    lost: list[Lost] = []
    with requests.Session() as session:
        for sha256, rows in missing.items():
            reasons = []
            for url, ext in rows:
                data, error = _from_source(url, sources, session)
                if data is not None and bytes_sha256(data) == sha256:
                    damaged = held.get(sha256)
                    target = damaged[0] if damaged is not None else _place_for(workspace, sha256, ext)
                    target = atomic_write_bytes(target, data)  # a damaged copy is replaced where it is
                    restored[sha256] = workspace.relative(target)
                    log.warning("%s was missing from the workspace: fetched again from %s", target.name, url)
                    break
                reasons.append(error or f"{url} now holds other bytes (sha256 {bytes_sha256(data or b'')[:12]})")
            else:
                if sha256 in held:  # damaged and not recoverable: out of the way, so that ingest says it is missing
                    _set_aside(workspace, held[sha256][0])
                lost.append(Lost(sha256, rows[0][0], "; ".join(reasons)))
                log.warning("LOST: %s (from %s) is gone from the workspace: %s", sha256, rows[0][0], reasons[-1])
    return Recovery(restored, lost)
