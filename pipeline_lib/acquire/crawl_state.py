"""One crawl's bookkeeping, shared by the downloader threads: which files the workspace holds, bytes into
incoming/, the log rows of this run, per-keyword counts, and checkpoints of the log.

Bytes land in incoming/<sha[:2]>/<sha>.<ext> (atomically) unless the workspace already holds that sha256; ingest
takes it from there. The threads write without a shared lock: which sha256s the workspace holds is an in-memory
index (one listing of store/, quarantine/ and incoming/ per crawl), a sha256 is claimed by the one thread that
writes it, and files are made durable in batches (their data and folders fsync'ed) just before the log that names
them is written.
"""

from __future__ import annotations

import io
import logging
import os
import re
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pandas as pd
from PIL import Image

from pipeline_lib.acquire.crawl_log import conform_log, write_crawl_log
from pipeline_lib.core.workspace import Workspace, atomic_write_bytes, bytes_sha256, sync_files

log = logging.getLogger(__name__)

SUMMARY_COLUMNS: tuple[str, ...] = ("source", "keyword", "new", "skipped", "failed", "error")
FORMAT_EXT: dict[str, str] = {
    "JPEG": "jpg",
    "MPO": "jpg",
    "PNG": "png",
    "GIF": "gif",
    "WEBP": "webp",
    "BMP": "bmp",
    "TIFF": "tiff",
}
CHECKPOINT_INTERVAL_S = 5.0
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def detect_ext(data: bytes, url: str) -> str:
    """File extension (no dot) from the image bytes, else from the URL's suffix, else 'bin'."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt = image.format
    except Exception:  # any undecodable or hostile payload: fall back to the URL
        fmt = None
    if fmt in FORMAT_EXT:
        return FORMAT_EXT[str(fmt)]
    suffix = PurePosixPath(urlsplit(url).path).suffix.lower().lstrip(".")
    if suffix and suffix.isascii() and suffix.isalnum() and len(suffix) <= 5:
        return "jpg" if suffix == "jpeg" else suffix
    return "bin"


def files_under(folder: Path, nested: bool) -> Iterator[os.DirEntry[str]]:
    """Files directly in folder, or in its sub-folders when nested (one level, as store/ab/ and incoming/ab/)."""
    if not folder.is_dir():
        return
    with os.scandir(folder) as entries:
        for entry in entries:
            if nested and entry.is_dir():
                with os.scandir(entry.path) as inner:
                    yield from (item for item in inner if item.is_file())
            elif not nested and entry.is_file():
                yield entry


def held_files(workspace: Workspace) -> dict[str, Path]:
    """sha256 -> an existing copy in store/, quarantine/ or incoming/ (in that order; the first name if several).

    One listing of each folder; temporary files (dot names) and names that are not <sha256>.<ext> are ignored.
    """
    held: dict[str, Path] = {}
    for folder, nested in ((workspace.store, True), (workspace.quarantine, False), (workspace.incoming, True)):
        for path in sorted(Path(entry.path) for entry in files_under(folder, nested)):
            stem = path.name.split(".", 1)[0]
            if SHA256_HEX.fullmatch(stem):
                held.setdefault(stem, path)
    return held


@dataclass(frozen=True)
class Origin:
    """Where the files of one crawl come from: source name, label/group per URL and generator."""

    source: str
    label: str
    keyword: str = ""
    generator: str = ""
    per_url: Mapping[str, tuple[str, str]] = field(default_factory=dict)  # url -> (label, group) for URL lists

    def meta(self, url: str) -> dict[str, str]:
        """label, group, keyword and generator of one URL."""
        label, group = self.per_url.get(url, (self.label, self.keyword))
        generator = self.generator or ("camera" if label == "real" else "unknown")
        return {"source": self.source, "label": label, "group": group, "keyword": group, "generator": generator}


class CrawlState:
    """Rows of this run, the URLs known to be fetched, per-keyword counts, and log checkpoints (thread-safe)."""

    def __init__(self, workspace: Workspace, previous: pd.DataFrame, now: datetime) -> None:
        self.workspace = workspace
        self.now = now
        self._previous = previous
        self._rows: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._held = held_files(workspace)  # sha256 -> a copy the workspace holds (this run's writes included)
        self._writing: dict[str, threading.Event] = {}  # sha256 -> set once the thread writing it is done
        self._unsynced: list[Path] = []  # written since the last checkpoint, not yet fsync'ed
        fetched = previous[previous["sha256"] != ""]
        self._known_urls = set(fetched["url"])
        self._known_pairs = set(zip(fetched["url"], fetched["sha256"], strict=True))
        failed = previous[previous["sha256"] == ""]
        self._failures = set(zip(failed["url"], failed["error"], strict=True))
        self._counts: dict[tuple[str, str], dict[str, int]] = {}
        self._errors: dict[tuple[str, str], list[str]] = {}
        self._saved_rows = 0
        self._saved_at = time.monotonic()

    def begin(self, source: str, keyword: str) -> None:
        """Make sure (source, keyword) has a summary row (in first-seen order)."""
        with self._lock:
            self._counts.setdefault((source, keyword), {"new": 0, "skipped": 0, "failed": 0})

    def count(self, source: str, keyword: str, kind: str) -> None:
        """Count one URL as new, skipped or failed."""
        self.begin(source, keyword)
        with self._lock:
            self._counts[(source, keyword)][kind] += 1

    def note(self, source: str, keyword: str, message: str) -> None:
        """Attach an error/note to a summary row."""
        self.begin(source, keyword)
        with self._lock:
            notes = self._errors.setdefault((source, keyword), [])
            if message not in notes:
                notes.append(message)

    def is_known(self, url: str) -> bool:
        """Whether url was fetched successfully before (earlier run or this one)."""
        with self._lock:
            return url in self._known_urls

    def is_known_pair(self, url: str, sha256: str) -> bool:
        """Whether this url with these exact bytes is already in the log."""
        with self._lock:
            return (url, sha256) in self._known_pairs

    def _claim(self, sha256: str) -> Path | threading.Event:
        """The held copy of sha256, or an event that the caller, now the one writer of sha256, sets when done.

        While another thread writes the same bytes, wait for it: then they are held, or it failed and we write.
        """
        while True:
            with self._lock:
                held = self._held.get(sha256)
                if held is not None:
                    return held
                busy = self._writing.get(sha256)
                if busy is None:
                    mine = self._writing[sha256] = threading.Event()
                    return mine
            busy.wait()

    def is_logged_failure(self, url: str, error: str) -> bool:
        """Whether url failed with exactly this error before (a file an import leaves out, logged once)."""
        with self._lock:
            return (url, error) in self._failures

    def store(self, data: bytes, url: str) -> tuple[str, str, bool]:
        """Put bytes into incoming/ (atomically, synced at the next checkpoint) unless already held.

        Returns (sha256, ext, is_new). Threads storing different bytes never wait for each other.
        """
        sha256 = bytes_sha256(data)
        ext = detect_ext(data, url)
        claimed = self._claim(sha256)
        if isinstance(claimed, Path):
            return sha256, claimed.suffix.lstrip(".") or ext, False
        target = self.workspace.incoming / sha256[:2] / f"{sha256}.{ext}"
        try:
            atomic_write_bytes(target, data, durable=False)
            with self._lock:
                self._held[sha256] = target
                self._unsynced.append(target)
        finally:
            with self._lock:
                del self._writing[sha256]
            claimed.set()
        return sha256, ext, True

    def sync(self) -> None:
        """Make the files written since the last call durable (before a log naming them is written)."""
        with self._lock:
            batch, self._unsynced = self._unsynced, []
        if batch:
            folders = sync_files(batch)
            log.debug("synced %d new files in %d folders", len(batch), folders)

    def record(self, meta: Mapping[str, str], url: str, sha256: str, ext: str, n_bytes: int, error: str) -> None:
        """Append one log row (sha256 "" and an error for a failure)."""
        row = {**meta, "url": url, "fetched_at": self.now, "sha256": sha256, "ext": ext, "n_bytes": n_bytes}
        row["error"] = error
        with self._lock:
            self._rows.append(row)
            if sha256:
                self._known_urls.add(url)
                self._known_pairs.add((url, sha256))
            else:
                self._failures.add((url, error))

    def counts_of(self, source: str, keyword: str) -> dict[str, int]:
        """new/skipped/failed so far for (source, keyword)."""
        with self._lock:
            return dict(self._counts.get((source, keyword), {"new": 0, "skipped": 0, "failed": 0}))

    def log_frame(self) -> pd.DataFrame:
        """The previous log plus this run's rows."""
        with self._lock:
            rows = list(self._rows)
        if not rows:
            return self._previous.copy()
        return pd.concat([self._previous, conform_log(pd.DataFrame(rows))], ignore_index=True)

    def checkpoint(self, force: bool = False) -> None:
        """Persist the log if rows were added (at most every CHECKPOINT_INTERVAL_S unless forced)."""
        with self._lock:
            n_rows = len(self._rows)
        due = force or time.monotonic() - self._saved_at >= CHECKPOINT_INTERVAL_S
        if n_rows == self._saved_rows or not due:
            return
        self.sync()  # the log must never name a file that a crash could still lose
        write_crawl_log(self.workspace, self.log_frame())
        self._saved_rows, self._saved_at = n_rows, time.monotonic()
        log.debug("crawl log checkpoint: %d new rows", n_rows)

    def summary(self) -> pd.DataFrame:
        """One row per (source, keyword): new, skipped, failed, error."""
        with self._lock:
            records = [
                {"source": s, "keyword": k, **counts, "error": "; ".join(self._errors.get((s, k), []))}
                for (s, k), counts in self._counts.items()
            ]
        frame = pd.DataFrame(records, columns=list(SUMMARY_COLUMNS))
        frame = frame.astype({"new": "int64", "skipped": "int64", "failed": "int64"})
        return frame.astype({"source": "string", "keyword": "string", "error": "string"})
