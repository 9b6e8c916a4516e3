"""Crawl: fetch images from search engines (icrawler), URL lists and local folders into incoming/.

Every URL tried is appended to a cumulative crawl log (workspace/crawl/log.parquet), written atomically after each
keyword/source, periodically during long crawls and at the end even when a source raised. Bytes land in
incoming/<sha[:2]>/<sha>.<ext> (atomically) unless the workspace already holds that sha256; ingest takes it from there.

The downloader threads write without a shared lock: which sha256s the workspace holds is an in-memory index (one
listing of store/, quarantine/ and incoming/ per crawl), a sha256 is claimed by the one thread that writes it, and
files are made durable in batches (their data and folders fsync'ed) just before the log that names them is written.
The HTTP connection pool keeps one connection per downloader thread.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import queue
import re
import threading
import time
import unicodedata
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

import pandas as pd
import requests
import urllib3
from icrawler import Crawler, ImageDownloader
from icrawler.builtin.baidu import BaiduFeeder, BaiduParser
from icrawler.builtin.bing import BingFeeder, BingParser
from icrawler.builtin.flickr import FlickrFeeder, FlickrParser
from icrawler.builtin.google import GoogleFeeder, GoogleParser
from icrawler.builtin.urllist import PseudoParser, UrlListFeeder
from icrawler.storage import BaseStorage
from PIL import Image

from pipeline_lib.acquire.safety import UnsafeUrlError, pin_session
from pipeline_lib.acquire.validate import not_an_image
from pipeline_lib.core.config import LABELS, FolderSource, SearchSource, SourcesConfig, UrlListSource
from pipeline_lib.core.progress import progress
from pipeline_lib.core.workspace import (
    Workspace,
    atomic_path,
    atomic_write_bytes,
    bytes_sha256,
    folder_files,
    sync_files,
)

log = logging.getLogger(__name__)

LOG_FILE = "log.parquet"
CRAWL_LOG_COLUMNS: dict[str, str] = {
    "url": "string",
    "source": "string",
    "keyword": "string",
    "label": "string",
    "group": "string",
    "generator": "string",
    "fetched_at": "datetime64[ns, UTC]",
    "sha256": "string",  # "" when the fetch failed
    "ext": "string",  # no dot
    "n_bytes": "int64",
    "error": "string",  # "" on success
}
SUMMARY_COLUMNS: tuple[str, ...] = ("source", "keyword", "new", "skipped", "failed", "error")
BING_ENDPOINT = "https://www.bing.com/images/async?q={keyword}&first={offset}"
BING_PAGE_STEP = 20
GOOGLE_PAGE_STEP = 100
BAIDU_ENDPOINT = "http://image.baidu.com/search/acjson?tn=resultjson_com&ipn=rj&word={keyword}&pn={offset}&rn=30"
BAIDU_PAGE_STEP = 30
FLICKR_API = "https://api.flickr.com/services/rest/"  # what icrawler's FlickrFeeder and FlickrParser call
# The search parameters icrawler's FlickrFeeder passes on to flickr.photos.search (it ignores any other key).
FLICKR_SEARCH_PARAMS = frozenset(
    {
        "user_id", "tags", "tag_mode", "text", "license", "sort", "privacy_filter", "accuracy", "safe_search",
        "content_type", "machine_tags", "machine_tag_mode", "group_id", "contacts", "woe_id", "place_id", "has_geo",
        "geo_context", "lat", "lon", "radius", "radius_units", "is_commons", "in_gallery", "is_getty", "extras",
        "per_page", "page", "color_codes", "styles", "orientation", "min_upload_date", "max_upload_date",
        "min_taken_date", "max_taken_date",
    }
)  # fmt: skip
FORMAT_EXT: dict[str, str] = {
    "JPEG": "jpg",
    "MPO": "jpg",
    "PNG": "png",
    "GIF": "gif",
    "WEBP": "webp",
    "BMP": "bmp",
    "TIFF": "tiff",
}
FLICKR_SIZES = ["original", "large 2048", "large 1600", "large", "medium 800", "medium 640", "medium"]
REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 5
MAX_DOWNLOAD_BYTES = 256 * 1024 * 1024
BACKOFF_BASE_S = 0.2
CHECKPOINT_INTERVAL_S = 5.0
POLL_INTERVAL_S = 0.05
QUEUE_TIMEOUT_S = 0.05  # how long an idle downloader thread waits before it checks whether the parsers are done
NO_RESULTS = "no results"
MAX_KEYWORD_LENGTH = 100  # characters of a search keyword or URL-list group
INCOMPLETE_READ = re.compile(r"IncompleteRead\((\d+) bytes read")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class CrawlResult:
    """The whole cumulative crawl log, one summary row per (source, keyword) of this run, and the (source, keyword)
    pairs not searched because they were searched less than sources.recrawl_after_hours ago."""

    log: pd.DataFrame
    summary: pd.DataFrame
    not_due: list[tuple[str, str]] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------------
# The crawl log


def crawl_log_path(workspace: Workspace) -> Path:
    """Where the cumulative crawl log lives."""
    return workspace.crawl / LOG_FILE


def conform_log(frame: pd.DataFrame) -> pd.DataFrame:
    """Return the log with exactly CRAWL_LOG_COLUMNS and their dtypes; ValueError naming missing columns."""
    missing = [name for name in CRAWL_LOG_COLUMNS if name not in frame.columns]
    if missing:
        raise ValueError(f"crawl log is missing columns {missing}; expected {list(CRAWL_LOG_COLUMNS)}")
    out = pd.DataFrame(index=range(len(frame)))
    for name, dtype in CRAWL_LOG_COLUMNS.items():
        column = frame[name].reset_index(drop=True)
        if name == "fetched_at":
            out[name] = pd.to_datetime(column, utc=True).astype(dtype)
        elif name == "n_bytes":
            out[name] = pd.to_numeric(column).fillna(0).astype(dtype)
        else:
            out[name] = column.fillna("").astype(str).astype(dtype)
    return out


def empty_log() -> pd.DataFrame:
    """A crawl log with all columns and no rows."""
    return conform_log(pd.DataFrame({name: [] for name in CRAWL_LOG_COLUMNS}))


class CrawlLogError(ValueError):
    """The crawl log is unreadable or not a crawl log; the message names the file."""


class SourceError(ValueError):
    """A source of the config is unusable (keywords, URL list, folder grouping); the message names it."""


def read_crawl_log(workspace: Workspace) -> pd.DataFrame:
    """The cumulative crawl log (empty if there is none yet); CrawlLogError naming the file if it is unreadable."""
    path = crawl_log_path(workspace)
    if not path.is_file():
        return empty_log()
    try:
        frame = pd.read_parquet(path, engine="pyarrow")
    except Exception as error:  # pyarrow raises several types for damaged files
        raise CrawlLogError(
            f"crawl log {path} is unreadable ({error}); `aidetect doctor --repair` sets it aside (a new log "
            "starts, and every URL is fetched again)"
        ) from None
    try:
        return conform_log(frame)
    except ValueError as error:
        raise CrawlLogError(f"crawl log {path}: {error}") from None


def write_crawl_log(workspace: Workspace, frame: pd.DataFrame) -> Path:
    """Write the log atomically to crawl/log.parquet."""
    path = crawl_log_path(workspace)
    with atomic_path(path) as tmp:
        conform_log(frame).to_parquet(tmp, index=False, engine="pyarrow")
    return path


SEARCHES_FILE = "searches.parquet"
SEARCH_COLUMNS: dict[str, str] = {"source": "string", "keyword": "string", "searched_at": "datetime64[ns, UTC]"}


def searches_path(workspace: Workspace) -> Path:
    """Where the last search time of every (search source, keyword) is kept."""
    return workspace.crawl / SEARCHES_FILE


def read_searches(workspace: Workspace) -> pd.DataFrame:
    """(source, keyword, searched_at) of every keyword searched before; empty if none; ValueError naming the file."""
    path = searches_path(workspace)
    if not path.is_file():
        return pd.DataFrame({name: pd.Series([], dtype=dtype) for name, dtype in SEARCH_COLUMNS.items()})
    try:
        frame = pd.read_parquet(path, engine="pyarrow")
        return frame[list(SEARCH_COLUMNS)].astype(SEARCH_COLUMNS)
    except Exception as error:  # pyarrow raises several types for damaged files
        raise ValueError(f"search log {path} is unreadable ({error}); delete it to search all keywords again") from None


def _record_searches(workspace: Workspace, previous: pd.DataFrame, summary: pd.DataFrame, now: datetime) -> None:
    """Stamp the keywords this run searched to the end (no results counts, an error does not): latest per keyword."""
    done = summary[summary["source"].str.startswith("search:") & summary["error"].isin(["", NO_RESULTS])]
    if done.empty:
        return
    fresh = pd.DataFrame({"source": done["source"], "keyword": done["keyword"], "searched_at": now})
    table = pd.concat([previous, fresh.astype(SEARCH_COLUMNS)], ignore_index=True)
    table = table.drop_duplicates(["source", "keyword"], keep="last").reset_index(drop=True)
    with atomic_path(searches_path(workspace)) as tmp:
        table.to_parquet(tmp, index=False, engine="pyarrow")


def due_keywords(
    searches: pd.DataFrame, source: str, keywords: list[str], now: datetime, hours: float
) -> tuple[list[str], list[str]]:
    """(keywords to search, keywords searched on source less than `hours` ago); hours 0: all are due."""
    rows = searches[searches["source"] == source]
    last = dict(zip(rows["keyword"], rows["searched_at"], strict=True))
    limit = pd.Timedelta(hours=hours)
    recent = [k for k in keywords if k in last and hours > 0 and pd.Timestamp(now) - last[k] < limit]
    return [k for k in keywords if k not in recent], recent


# ---------------------------------------------------------------------------------------------------------------
# Bytes -> incoming/


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


def _files_under(folder: Path, nested: bool) -> Iterator[Path]:
    """Files directly in folder, or in its sub-folders when nested (one level, as store/ab/ and incoming/ab/)."""
    if not folder.is_dir():
        return
    with os.scandir(folder) as entries:
        for entry in entries:
            if nested and entry.is_dir():
                with os.scandir(entry.path) as inner:
                    yield from (Path(item.path) for item in inner if item.is_file())
            elif not nested and entry.is_file():
                yield Path(entry.path)


def held_files(workspace: Workspace) -> dict[str, Path]:
    """sha256 -> an existing copy in store/, quarantine/ or incoming/ (in that order; the first name if several).

    One listing of each folder; temporary files (dot names) and names that are not <sha256>.<ext> are ignored.
    """
    held: dict[str, Path] = {}
    for folder, nested in ((workspace.store, True), (workspace.quarantine, False), (workspace.incoming, True)):
        for path in sorted(_files_under(folder, nested)):
            stem = path.name.split(".", 1)[0]
            if SHA256_HEX.fullmatch(stem):
                held.setdefault(stem, path)
    return held


# ---------------------------------------------------------------------------------------------------------------
# Run state shared by the downloader threads


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


# ---------------------------------------------------------------------------------------------------------------
# HTTP


def _redirect_target(response: requests.Response, url: str) -> str | None:
    if response.status_code in REDIRECT_CODES and response.headers.get("Location"):
        return urljoin(url, response.headers["Location"])
    return None


class TruncatedBodyError(requests.exceptions.ChunkedEncodingError):
    """The connection closed before the body declared by Content-Length was complete (retryable)."""


def _declared_length(response: requests.Response) -> int | None:
    """Content-Length of an unencoded body (None if absent, malformed or content-encoded, e.g. gzip)."""
    if response.headers.get("Content-Encoding", "identity").strip().lower() not in ("", "identity"):
        return None
    try:
        length = int(response.headers.get("Content-Length", ""))
    except ValueError:
        return None
    return length if length >= 0 else None


class DownloadDeadlineError(requests.exceptions.Timeout):
    """A download took longer than sources.download_timeout_s in all (a server trickling bytes); not retried."""


def _remaining(deadline: float, what: str) -> float:
    """Seconds left before deadline; DownloadDeadlineError when none are."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise DownloadDeadlineError(f"{what}: the download deadline (sources.download_timeout_s) passed")
    return left


def _body_chunks(response: requests.Response, deadline: float) -> Iterator[bytes]:
    """The body as it arrives (each read returns what one receive brings), checking the deadline between reads."""
    while True:
        _remaining(deadline, "reading the body")
        try:
            chunk = response.raw.read1(1 << 16, decode_content=True)
        except urllib3.exceptions.ReadTimeoutError as error:
            raise requests.exceptions.ReadTimeout(str(error)) from None
        except (urllib3.exceptions.ProtocolError, urllib3.exceptions.DecodeError) as error:
            raise requests.exceptions.ChunkedEncodingError(str(error)) from None
        if not chunk:
            return
        yield chunk


def _read_body(response: requests.Response, deadline: float = math.inf) -> bytes:
    """The whole body before deadline, refusing more than MAX_DOWNLOAD_BYTES (a declared Content-Length over it
    before reading anything); TruncatedBodyError if shorter than Content-Length."""
    declared = _declared_length(response)
    if declared is not None and declared > MAX_DOWNLOAD_BYTES:
        raise ValueError(f"declared Content-Length {declared} is over the {MAX_DOWNLOAD_BYTES}-byte limit")
    chunks, total = [], 0
    try:
        for chunk in _body_chunks(response, deadline):
            total += len(chunk)
            if total > MAX_DOWNLOAD_BYTES:
                raise ValueError(f"response larger than {MAX_DOWNLOAD_BYTES} bytes")
            chunks.append(chunk)
    except requests.exceptions.ChunkedEncodingError as error:
        if declared is not None and INCOMPLETE_READ.search(str(error)):  # urllib3 noticed the short body first
            raise TruncatedBodyError(f"truncated body: got {total} of {declared} bytes") from None
        raise
    if declared is not None and total < declared:
        raise TruncatedBodyError(f"truncated body: got {total} of {declared} bytes")
    return b"".join(chunks)


def _timeouts(sources: SourcesConfig, deadline: float) -> tuple[float, float]:
    """(connect, read) timeouts of one request: request_timeout_s, never past the download's deadline."""
    left = _remaining(deadline, "before the request")
    return min(sources.request_timeout_s, left), min(sources.request_timeout_s, left)


def _get_once(
    session: requests.Session, url: str, sources: SourcesConfig, deadline: float = math.inf
) -> tuple[int, bytes]:
    """One GET following redirects by hand; the session's PinnedAdapter checks each hop and connects to the address
    that passed the check. (status, body)."""
    for _ in range(MAX_REDIRECTS + 1):
        timeout = _timeouts(sources, deadline)
        with session.get(url, timeout=timeout, allow_redirects=False, stream=True) as response:
            target = _redirect_target(response, url)
            if target is None:
                body = _read_body(response, deadline) if 200 <= response.status_code < 300 else b""
                return response.status_code, body
        url = target
    raise ValueError(f"more than {MAX_REDIRECTS} redirects")


def fetch_bytes(session: requests.Session, url: str, sources: SourcesConfig) -> tuple[bytes | None, str]:
    """GET url with retries (connection errors, timeouts, truncated bodies, 5xx, 429; backoff 0.2s*2**i), all
    within sources.download_timeout_s; every hop checked and pinned (the session gets a PinnedAdapter).

    Returns (bytes, "") or (None, error); a body shorter than its Content-Length is never returned.
    """
    pin_session(session, sources.allow_private_addresses)
    deadline = time.monotonic() + sources.download_timeout_s
    error = ""
    for attempt in range(sources.max_retries + 1):
        if attempt:
            time.sleep(min(BACKOFF_BASE_S * 2 ** (attempt - 1), max(0.0, deadline - time.monotonic())))
        try:
            status, body = _get_once(session, url, sources, deadline)
        except UnsafeUrlError as unsafe:
            return None, str(unsafe)
        except DownloadDeadlineError as late:
            return None, f"took longer than {sources.download_timeout_s:g} s in all ({late})"
        except TruncatedBodyError as failure:
            error = str(failure)
            continue
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as failure:
            error = f"{type(failure).__name__}: {failure}"
            continue
        except (requests.RequestException, ValueError) as failure:
            return None, f"{type(failure).__name__}: {failure}"
        if 200 <= status < 300:
            return body, ""
        error = f"http {status}"
        if status != 429 and status < 500:
            return None, error
    return None, error[:500]


# ---------------------------------------------------------------------------------------------------------------
# icrawler components


class _NoStorage(BaseStorage):
    """icrawler wants a storage backend; ours writes through the workspace instead."""

    def write(self, id: str, data: bytes) -> None:  # noqa: A002 - icrawler's signature
        raise RuntimeError("crawl downloads are written to workspace/incoming by the downloader")

    def exists(self, id: str) -> bool:  # noqa: A002
        return False

    def max_file_idx(self) -> int:
        return 0


class WorkspaceDownloader(ImageDownloader):
    """icrawler downloader that checks URL safety, retries, and logs every URL into a CrawlState."""

    def __init__(
        self,
        thread_num: int,
        signal: Any,
        session: Any,
        storage: Any,
        state: CrawlState,
        origin: Origin,
        sources: SourcesConfig,
    ) -> None:
        super().__init__(thread_num, signal, session, storage)
        self.state, self.origin, self.sources = state, origin, sources
        self.max_num = 0
        self._pending = 0
        self._seen: set[str] = set()

    def worker_exec(
        self, max_num: int, default_ext: str = "jpg", queue_timeout: float = QUEUE_TIMEOUT_S, **kwargs: Any
    ) -> None:
        """Take tasks until the parsers are done (an empty queue alone does not end the worker)."""
        self.max_num = max_num
        while not self.signal.get("reach_max_num"):
            try:
                task = self.in_queue.get(timeout=queue_timeout)
            except queue.Empty:
                if self.signal.get("parser_exited"):
                    break
                continue
            try:
                self.download(task, default_ext)
            except Exception as error:  # one bad URL must not kill the worker
                log.exception("downloader failed on %s", task.get("file_url"))
                url = str(task.get("file_url") or "")
                self._log_failure(url, f"{type(error).__name__}: {error}")
            finally:
                self.in_queue.task_done()

    def _reserve(self) -> bool:
        """Reserve a slot under max_num (waiting for in-flight downloads); False once max_num is reached."""
        while True:
            with self.lock:
                if self.signal.get("reach_max_num") or (0 < self.max_num <= self.fetched_num):
                    self.signal.set(reach_max_num=True)
                    return False
                if self.max_num <= 0 or self.fetched_num + self._pending < self.max_num:
                    self._pending += 1
                    return True
            time.sleep(0.01)

    def _release(self, counted: bool) -> None:
        with self.lock:
            self._pending -= 1
            if counted:
                self.fetched_num += 1

    def _log_failure(self, url: str, error: str) -> None:
        meta = self.origin.meta(url)
        self.state.record(meta, url, "", "", 0, error)
        self.state.count(meta["source"], meta["keyword"], "failed")

    def download(
        self,
        task: dict[str, Any],
        default_ext: str,
        timeout: int = 5,
        max_retry: int = 3,
        overwrite: bool = False,
        **kwargs: Any,
    ) -> bool:
        """Fetch one URL into incoming/ (or count it skipped); True when it counts towards max_num."""
        url = str(task.get("file_url") or "")
        task["success"], task["filename"] = False, None
        with self.lock:
            if not url or url in self._seen:  # the same URL listed twice in one crawl
                return False
            self._seen.add(url)
        if not self._reserve():
            return False
        counted = False
        try:
            counted = self._fetch(url)
        finally:
            self._release(counted)
        task["success"] = counted
        return counted

    def _fetch(self, url: str) -> bool:
        meta = self.origin.meta(url)
        source, keyword = meta["source"], meta["keyword"]
        if self.state.is_known(url):
            self.state.count(source, keyword, "skipped")
            return True
        data, error = fetch_bytes(self.session, url, self.sources)
        if data is None:
            log.warning("%s %r: %s failed: %s", source, keyword, url, error)
            self._log_failure(url, error)
            return False
        sha256, ext, new = self.state.store(data, url)
        self.state.record(meta, url, sha256, ext, len(data), "")
        self.state.count(source, keyword, "new" if new else "skipped")
        return True


class _PageSession:
    """Wraps the crawler's session for parsers: page failures become notes; URLs under rewrite[0] are sent to
    rewrite[1] instead (an API mirror, e.g. a loopback Flickr for tests)."""

    def __init__(self, session: requests.Session, notes: list[str], rewrite: tuple[str, str] | None = None) -> None:
        self._session, self._notes, self._rewrite = session, notes, rewrite

    def get(self, url: str, **kwargs: Any) -> requests.Response:
        if self._rewrite is not None and url.startswith(self._rewrite[0]):
            url = self._rewrite[1] + url[len(self._rewrite[0]) :]
        try:
            return self._session.get(url, **kwargs)  # through the PinnedAdapter: checked and pinned, every hop
        except UnsafeUrlError as error:
            self._notes.append(f"search page refused: {error}")
            raise
        except Exception as error:
            self._notes.append(f"search page failed ({urlsplit(url).netloc}): {type(error).__name__}")
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


class _GuardedParse:
    """Parser mixin: a parse that returns None or raises yields no tasks (and a note) instead of killing a worker."""

    def __init__(
        self,
        thread_num: int,
        signal: Any,
        session: Any,
        notes: list[str] | None = None,
        rewrite: tuple[str, str] | None = None,
    ) -> None:
        super().__init__(thread_num, signal, session)  # type: ignore[call-arg]
        self.notes: list[str] = notes if notes is not None else []
        self.session = _PageSession(session, self.notes, rewrite)

    def parse(self, response: requests.Response, **kwargs: Any) -> list[dict[str, Any]]:
        if response.status_code != 200:
            self.notes.append(f"search page http {response.status_code}")
            return []
        try:
            tasks = super().parse(response, **kwargs)  # type: ignore[misc]
            if tasks is None:  # e.g. GoogleParser when no <script> holds image URLs (changed markup)
                log.warning("search page %s holds nothing %s can read", response.url, type(self).__name__)
                self.notes.append(f"search page unparsable: no image URLs found by {_engine_name(self)} parser")
                return []
            return list(tasks)
        except Exception as error:  # engines change their HTML; never crash the worker
            log.warning("could not parse search page %s: %s", response.url, error)
            self.notes.append(f"search page unparsable: {type(error).__name__}")
            return []


def _engine_name(parser: object) -> str:
    """'google' for _GoogleParser, etc."""
    return type(parser).__name__.strip("_").removesuffix("Parser").lower()


class _BingParser(_GuardedParse, BingParser):
    pass


class _GoogleParser(_GuardedParse, GoogleParser):
    pass


class _BaiduParser(_GuardedParse, BaiduParser):
    pass


class _FlickrParser(_GuardedParse, FlickrParser):
    pass


class EndpointBingFeeder(BingFeeder):
    """BingFeeder that formats a configurable endpoint (keyword URL-quoted) instead of the hard-coded bing.com."""

    def feed(
        self,
        keyword: str,
        offset: int,
        max_num: int,
        filters: dict[str, str] | None = None,
        endpoint: str = BING_ENDPOINT,
    ) -> None:
        filter_str = self.get_filter().apply(filters)
        suffix = "&qft=" + filter_str if filter_str else ""
        for first in range(offset, offset + max_num, BING_PAGE_STEP):
            self.out_queue.put(endpoint.format(keyword=quote(keyword, safe=""), offset=first) + suffix)


class EndpointGoogleFeeder(GoogleFeeder):
    """GoogleFeeder that, given an endpoint, formats it (keyword URL-quoted, filters as &tbs=) instead of google.com."""

    def feed(
        self,
        keyword: str,
        offset: int,
        max_num: int,
        language: str | None = None,
        filters: dict[str, str] | None = None,
        endpoint: str | None = None,
    ) -> None:
        if endpoint is None:  # the real site, with icrawler's own parameters and filters
            super().feed(keyword, offset, max_num, language=language, filters=filters)
            return
        filter_str = self.get_filter().apply(filters, sep=",")
        suffix = "&tbs=" + quote(filter_str, safe=":,") if filter_str else ""
        for start in range(offset, offset + max_num, GOOGLE_PAGE_STEP):
            self.out_queue.put(endpoint.format(keyword=quote(keyword, safe=""), offset=start) + suffix)


class EndpointBaiduFeeder(BaiduFeeder):
    """BaiduFeeder that formats a configurable endpoint (keyword URL-quoted) with Baidu's filters appended."""

    def feed(
        self, keyword: str, offset: int, max_num: int, filters: dict[str, str] | None = None, endpoint: str = ""
    ) -> None:
        filter_str = self.get_filter().apply(filters, sep="&")
        suffix = "&" + filter_str if filter_str else ""
        template = endpoint or BAIDU_ENDPOINT
        for start in range(offset, offset + max_num, BAIDU_PAGE_STEP):
            self.out_queue.put(template.format(keyword=quote(keyword, safe=""), offset=start) + suffix)


class _Crawler(Crawler):
    """icrawler's Crawler with a quiet logger setup and a fast poll loop that checkpoints the log."""

    heartbeat: Callable[[], None] | None = None

    def set_logger(self, log_level: int = logging.INFO) -> None:
        """Set icrawler's component loggers to log_level (no logging.basicConfig side effect)."""
        self.logger = logging.getLogger("icrawler")
        for name in ("icrawler", "feeder", "parser", "downloader"):
            logging.getLogger(name).setLevel(log_level)

    def crawl(
        self,
        feeder_kwargs: dict[str, Any] | None = None,
        parser_kwargs: dict[str, Any] | None = None,
        downloader_kwargs: dict[str, Any] | None = None,
    ) -> None:
        """Start feeder, parser and downloader threads and wait until the downloaders are done."""
        self.signal.reset()
        self.feeder.start(**(feeder_kwargs or {}))
        self.parser.start(**(parser_kwargs or {}))
        self.downloader.start(**(downloader_kwargs or {}))
        while self.downloader.is_alive():
            if not self.feeder.is_alive():
                self.signal.set(feeder_exited=True)
            if not self.parser.is_alive():
                self.signal.set(parser_exited=True)
            if self.heartbeat is not None:
                self.heartbeat()
            time.sleep(POLL_INTERVAL_S)
        for component in (self.feeder, self.parser):
            component.in_queue.queue.clear()
        self.downloader.clear_buffer(True)


def _run_crawler(
    state: CrawlState,
    sources: SourcesConfig,
    origin: Origin,
    components: tuple[type, type],
    threads: int,
    feeder_kwargs: dict[str, Any],
    parser_kwargs: dict[str, Any],
    max_num: int,
    notes: list[str] | None,
    rewrite: tuple[str, str] | None = None,
) -> None:
    """Build an icrawler Crawler with our downloader and run it to the end (rewrite: see _PageSession)."""
    feeder_cls, parser_cls = components
    parser_args = None if notes is None else {"notes": notes} | ({"rewrite": rewrite} if rewrite else {})
    crawler = _Crawler(
        feeder_cls=feeder_cls,
        parser_cls=parser_cls,
        downloader_cls=WorkspaceDownloader,
        downloader_threads=threads,
        storage=_NoStorage(),
        log_level=logging.WARNING,
        extra_parser_args=parser_args,
        extra_downloader_args={"state": state, "origin": origin, "sources": sources},
    )
    # search pages, feeds and downloads alike: checked, pinned, one connection per downloader thread (+ the parser)
    pin_session(crawler.session, sources.allow_private_addresses, pool_connections=10, pool_maxsize=threads + 1)
    crawler.heartbeat = state.checkpoint
    crawler.crawl(
        feeder_kwargs=feeder_kwargs,
        parser_kwargs={"queue_timeout": 0.3, **parser_kwargs},
        downloader_kwargs={"max_num": max_num},
    )


# ---------------------------------------------------------------------------------------------------------------
# Search sources


ENGINES: dict[str, tuple[type, type]] = {
    "bing": (EndpointBingFeeder, _BingParser),
    "google": (EndpointGoogleFeeder, _GoogleParser),
    "baidu": (EndpointBaiduFeeder, _BaiduParser),
    "flickr": (FlickrFeeder, _FlickrParser),
}
TEMPLATE_ENGINES: tuple[str, ...] = ("bing", "google", "baidu")  # endpoint: a search-page URL template
ENDPOINT_ENGINES: tuple[str, ...] = (*TEMPLATE_ENGINES, "flickr")  # flickr's endpoint: its REST API URL


def _read_utf8(path: Path, what: str) -> str:
    """A user's text file (UTF-8, BOM allowed); FileNotFoundError or ValueError naming what and where."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(f"{what} {path} is not UTF-8 text ({error})") from None


def _clean_keyword(text: str) -> str:
    return unicodedata.normalize("NFC", text).strip()


def read_keywords(path: Path) -> list[str]:
    """Keywords from a UTF-8 .txt (one per line, '#' comments) or .csv (a `keyword` column)."""
    path = Path(path)
    text = _read_utf8(path, "keywords file")
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        if "keyword" not in (reader.fieldnames or []):
            raise ValueError(f"keywords file {path} has no 'keyword' column (columns: {reader.fieldnames})")
        values = [row.get("keyword") or "" for row in reader]
    else:
        values = [line for line in text.splitlines() if not line.strip().startswith("#")]
    return [kw for kw in map(_clean_keyword, values) if kw]


def check_keyword_length(keyword: str, where: str) -> str:
    """The keyword, or ValueError naming where it came from when it is longer than MAX_KEYWORD_LENGTH."""
    if len(keyword) > MAX_KEYWORD_LENGTH:
        raise ValueError(
            f"{where}: keyword {keyword[:40]!r}... is {len(keyword)} characters long; the limit is "
            f"{MAX_KEYWORD_LENGTH} (a keyword names a group, and metrics and tables are named after it)"
        )
    return keyword


def source_keywords(source: SearchSource, index: int) -> list[str]:
    """Inline keywords plus those of keywords_file, de-duplicated in order; ValueError if there are none or one is
    longer than MAX_KEYWORD_LENGTH."""
    where = f"sources.search[{index}]"
    keywords = [check_keyword_length(_clean_keyword(k), f"{where}.keywords") for k in source.keywords]
    if source.keywords_file is not None:
        keywords += [check_keyword_length(k, str(source.keywords_file)) for k in read_keywords(source.keywords_file)]
    unique = list(dict.fromkeys(k for k in keywords if k))
    if not unique:
        empty = f" (the keywords file {source.keywords_file} holds none)" if source.keywords_file else ""
        raise ValueError(f"{where} has no keywords (set keywords or keywords_file){empty}")
    return unique


def _check_endpoint(engine: str, endpoint: str, where: str) -> None:
    """A search-page template with {keyword} and {offset} (bing, google, baidu) or an http(s) API URL (flickr)."""
    if engine == "flickr":
        if urlsplit(endpoint).scheme not in ("http", "https") or "{" in endpoint:
            raise ValueError(f"{where} for flickr must be the http(s) URL of its REST API, got {endpoint!r}")
        return
    try:
        probe = endpoint.format(keyword="k", offset=0)
    except (KeyError, IndexError, ValueError) as error:
        raise ValueError(f"{where} must use only {{keyword}} and {{offset}}: {error!r}") from None
    if "{keyword}" not in endpoint or "{offset}" not in endpoint:
        raise ValueError(f"{where} must contain {{keyword}} and {{offset}}, got {endpoint!r}")
    if urlsplit(probe).scheme not in ("http", "https"):
        raise ValueError(f"{where} must be an http(s) URL, got {endpoint!r}")


def _filter_error(engine: str, filters: dict[str, str]) -> str:
    """Why the engine refuses these filters ("" when it takes them all): icrawler's vocabulary per engine."""
    if engine == "flickr":
        unknown = sorted(set(filters) - FLICKR_SEARCH_PARAMS)
        return f"unsupported flickr search parameter(s) {', '.join(unknown)}" if unknown else ""
    try:
        ENGINES[engine][0].get_filter(None).apply(filters or None)
    except (KeyError, ValueError, TypeError, AssertionError) as error:
        return str(error) or f"{type(error).__name__} for {filters}"
    return ""


def portable_filters(filters: dict[str, str], engine: str) -> tuple[dict[str, str], dict[str, str]]:
    """(the filters engine supports, the ones it does not): each filter is tried alone in engine's vocabulary."""
    kept = {name: value for name, value in filters.items() if not _filter_error(engine, {name: value})}
    return kept, {name: value for name, value in filters.items() if name not in kept}


def _check_search_source(source: SearchSource, index: int) -> None:
    """Engine-specific settings: endpoint form per engine, api_key for flickr, filters the engine knows."""
    where = f"sources.search[{index}]"
    if source.endpoint is not None:
        _check_endpoint(source.engine, source.endpoint, f"{where}.endpoint")
    if source.fallback_endpoint is not None and source.fallback_engine is not None:
        _check_endpoint(source.fallback_engine, source.fallback_endpoint, f"{where}.fallback_endpoint")
    if source.engine == "flickr" and not source.api_key:
        raise ValueError(f"{where}.api_key is required for engine flickr")
    error = _filter_error(source.engine, dict(source.filters))
    if error:
        raise ValueError(f"{where}.filters: {error}")


def _search_kwargs(source: SearchSource, keyword: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """feeder and parser kwargs of one keyword for the source's engine."""
    filters = dict(source.filters) or None
    if source.engine == "bing":
        feeder = {"keyword": keyword, "offset": 0, "max_num": source.max_num, "filters": filters}
        return feeder | {"endpoint": source.endpoint or BING_ENDPOINT}, {}
    if source.engine == "google":
        feeder = {"keyword": keyword, "offset": 0, "max_num": source.max_num, "language": None, "filters": filters}
        return feeder | {"endpoint": source.endpoint}, {}
    if source.engine == "baidu":
        feeder = {"keyword": keyword, "offset": 0, "max_num": source.max_num, "filters": filters}
        return feeder | {"endpoint": source.endpoint or BAIDU_ENDPOINT}, {}
    feeder = {"apikey": source.api_key, "max_num": source.max_num, "text": keyword, **source.filters}
    return feeder, {"apikey": source.api_key, "size_preference": FLICKR_SIZES}


@dataclass(frozen=True)
class _SearchJob:
    source: SearchSource
    keywords: list[str]


def _crawl_keyword(state: CrawlState, sources: SourcesConfig, job: _SearchJob, keyword: str) -> None:
    """One keyword of one search source; any exception becomes the keyword's summary error."""
    source = job.source
    name = f"search:{source.engine}"
    origin = Origin(source=name, label=source.label, keyword=keyword)
    state.begin(name, keyword)
    notes: list[str] = []
    feeder_kwargs, parser_kwargs = _search_kwargs(source, keyword)
    parser_kwargs |= {"req_timeout": sources.request_timeout_s, "max_retry": sources.max_retries + 1}
    # icrawler's Flickr components call the API at a fixed URL: a configured endpoint replaces it.
    rewrite = (FLICKR_API, source.endpoint) if source.engine == "flickr" and source.endpoint else None
    try:
        _run_crawler(
            state,
            sources,
            origin,
            ENGINES[source.engine],
            source.threads,
            feeder_kwargs,
            parser_kwargs,
            source.max_num,
            notes,
            rewrite,
        )
    except Exception as error:
        log.exception("%s %r failed", name, keyword)
        state.note(name, keyword, f"{type(error).__name__}: {error}")
    for note in notes:
        state.note(name, keyword, note)
    counts = state.counts_of(name, keyword)
    if sum(counts.values()) == 0 and not notes:
        state.note(name, keyword, NO_RESULTS)
    log.info("%s %r: new=%d skipped=%d failed=%d", name, keyword, counts["new"], counts["skipped"], counts["failed"])


# ---------------------------------------------------------------------------------------------------------------
# URL lists


@dataclass(frozen=True)
class UrlEntry:
    """One line of a URL list."""

    url: str
    label: str
    group: str


def read_url_list(path: Path) -> list[UrlEntry]:
    """Rows of a url,label,group CSV; ValueError naming file and line for a missing column, bad label or empty url."""
    path = Path(path)
    text = _read_utf8(path, "URL list")
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in ("url", "label", "group") if c not in (reader.fieldnames or [])]
    if missing:
        raise ValueError(f"{path}, line 1: missing column(s) {', '.join(missing)} (header must be url,label,group)")
    entries: dict[str, UrlEntry] = {}
    for row in reader:
        line = reader.line_num
        url, label = (row.get("url") or "").strip(), (row.get("label") or "").strip()
        group = _clean_keyword(row.get("group") or "")
        if not url:
            raise ValueError(f"{path}, line {line}: empty url")
        if label not in LABELS:
            raise ValueError(f"{path}, line {line}: label {label!r} must be one of {', '.join(LABELS)}")
        if not group:
            raise ValueError(f"{path}, line {line}: empty group")
        check_keyword_length(group, f"{path}, line {line}")
        earlier = entries.setdefault(url, UrlEntry(url, label, group))
        if (earlier.label, earlier.group) != (label, group):
            raise ValueError(
                f"{path}, line {line}: {url} was listed before with label/group {earlier.label}/{earlier.group}"
            )
    return list(entries.values())


@dataclass(frozen=True)
class _UrlJob:
    source: UrlListSource
    entries: list[UrlEntry]


def _crawl_url_list(state: CrawlState, sources: SourcesConfig, job: _UrlJob) -> None:
    """Fetch a URL list with icrawler's UrlListFeeder + PseudoParser and our downloader."""
    name = f"urls:{job.source.csv.name}"
    for entry in job.entries:
        state.begin(name, entry.group)
    if not job.entries:
        state.note(name, "", "empty URL list")
        return
    per_url = {e.url: (e.label, e.group) for e in job.entries}
    origin = Origin(source=name, label="", per_url=per_url)
    try:
        _run_crawler(
            state,
            sources,
            origin,
            (UrlListFeeder, PseudoParser),
            job.source.threads,
            {"url_list": list(per_url)},
            {},
            0,
            None,
        )
    except Exception as error:
        log.exception("%s failed", name)
        for group in dict.fromkeys(e.group for e in job.entries):
            state.note(name, group, f"{type(error).__name__}: {error}")


# ---------------------------------------------------------------------------------------------------------------
# Folders

GroupOf = Callable[[Path], tuple[str, str]]  # file -> (group, error)


def _group_by_folder(root: Path) -> GroupOf:
    def group_of(path: Path) -> tuple[str, str]:
        parts = path.relative_to(root).parts
        return (parts[0] if len(parts) > 1 else path.stem), ""

    return group_of


def _group_by_pattern(pattern: str, where: str) -> GroupOf:
    try:
        regex = re.compile(pattern)
    except re.error as error:
        raise ValueError(f"{where}: invalid regular expression {pattern!r} ({error})") from None

    def group_of(path: Path) -> tuple[str, str]:
        match = regex.search(path.name)
        group = (match.group(1) if regex.groups else match.group(0)) if match else None
        return (group, "") if group else ("", "group pattern did not match")

    return group_of


def read_group_table(path: Path) -> dict[str, tuple[str, str]]:
    """file (relative to the folder, POSIX) -> (group, generator) from a CSV with columns file,group[,generator].

    generator is "" where the optional column is absent or the cell is empty (the folder's generator applies).
    """
    reader = csv.DictReader(io.StringIO(_read_utf8(path, "group CSV")))
    missing = [c for c in ("file", "group") if c not in (reader.fieldnames or [])]
    if missing:
        raise ValueError(
            f"{path}, line 1: missing column(s) {', '.join(missing)} (header must be file,group[,generator])"
        )
    table: dict[str, tuple[str, str]] = {}
    for row in reader:
        file, group = (row.get("file") or "").strip(), _clean_keyword(row.get("group") or "")
        if not file or not group:
            raise ValueError(f"{path}, line {reader.line_num}: empty file or group")
        table[PurePosixPath(Path(file).as_posix()).as_posix()] = (group, _clean_keyword(row.get("generator") or ""))
    return table


def read_group_csv(path: Path, root: Path) -> dict[str, str]:
    """file (relative to root, POSIX) -> group from a CSV with columns file,group[,generator]."""
    return {file: group for file, (group, _) in read_group_table(path).items()}


def _group_csv_path(spec: str, root: Path) -> Path:
    csv_path = Path(spec)
    return csv_path if csv_path.is_absolute() else root / csv_path


def _group_by_csv(spec: str, root: Path) -> GroupOf:
    csv_path = _group_csv_path(spec, root)
    groups = read_group_csv(csv_path, root)

    def group_of(path: Path) -> tuple[str, str]:
        group = groups.get(path.relative_to(root).as_posix())
        return (group, "") if group else ("", f"no group in {csv_path.name}")

    return group_of


def folder_grouper(source: FolderSource, index: int) -> GroupOf:
    """The group function of a folder source's group_by setting."""
    root = Path(source.path)
    where = f"sources.folders[{index}].group_by"
    if source.group_by == "folder":
        return _group_by_folder(root)
    if source.group_by.startswith("pattern:"):
        return _group_by_pattern(source.group_by.removeprefix("pattern:"), where)
    return _group_by_csv(source.group_by.removeprefix("csv:"), root)


GeneratorOf = Callable[[Path], str]  # file -> generator


def folder_generators(source: FolderSource) -> GeneratorOf:
    """The generator of each file: the group CSV's generator column where it names one, else source.generator."""
    root = Path(source.path)
    if not source.group_by.startswith("csv:"):
        return lambda path: source.generator
    table = read_group_table(_group_csv_path(source.group_by.removeprefix("csv:"), root))

    def generator_of(path: Path) -> str:
        _, generator = table.get(path.relative_to(root).as_posix(), ("", ""))
        return generator or source.generator

    return generator_of


def image_files(root: Path) -> Iterator[Path]:
    """The files under root an import takes to ingest: images whatever their name, and files named like images."""
    for path in folder_files(root):
        if not not_an_image(path):
            yield path


@dataclass(frozen=True)
class _FolderJob:
    source: FolderSource
    group_of: GroupOf
    generator_of: GeneratorOf | None = None  # default: source.generator for every file


def _crawl_folder(state: CrawlState, job: _FolderJob) -> None:
    """Copy a folder's images into incoming/ (the user's files are only read); log every other file with its reason."""
    source = job.source
    name = f"folder:{Path(source.path).name}"
    found = False
    files = list(folder_files(Path(source.path)))
    for path in progress(files, len(files), f"crawl {name}", unit="file"):
        reason = not_an_image(path)
        if reason:
            _skip_file(state, name, source, path, reason)
        else:
            found = True
            generator = job.generator_of(path) if job.generator_of is not None else source.generator
            _import_file(state, name, source, path, job.group_of, generator)
        state.checkpoint()
    if not found:
        state.note(name, "", f"no image files in {source.path}")


def _skip_file(state: CrawlState, name: str, source: FolderSource, path: Path, reason: str) -> None:
    """Log a file the import leaves out (no sha256, the reason as its error) unless it is logged so already."""
    url = path.absolute().as_uri()
    if state.is_logged_failure(url, reason):
        return
    meta = {"source": name, "label": source.label, "group": "", "keyword": "", "generator": source.generator}
    state.record(meta, url, "", "", path.stat().st_size, reason)


def _import_file(
    state: CrawlState, name: str, source: FolderSource, path: Path, group_of: GroupOf, generator: str | None = None
) -> None:
    url = path.absolute().as_uri()
    group, error = group_of(path)
    generator = source.generator if generator is None else generator
    meta = {"source": name, "label": source.label, "group": group, "keyword": group, "generator": generator}
    try:
        data = path.read_bytes()
    except OSError as failure:
        error = error or f"unreadable: {failure}"
        data = b""
    if error:
        state.record(meta, url, "", "", len(data), error)
        state.count(name, group, "failed")
        return
    sha256 = bytes_sha256(data)
    if state.is_known_pair(url, sha256):
        state.count(name, group, "skipped")
        return
    sha256, ext, new = state.store(data, url)
    state.record(meta, url, sha256, ext, len(data), "")
    state.count(name, group, "new" if new else "skipped")


# ---------------------------------------------------------------------------------------------------------------
# Entry point


def _plan(sources: SourcesConfig) -> list[_SearchJob | _UrlJob | _FolderJob]:
    """Validate every source (keywords, CSVs, folders) before anything is fetched."""
    jobs: list[_SearchJob | _UrlJob | _FolderJob] = []
    for index, source in enumerate(sources.search):
        _check_search_source(source, index)
        jobs.append(_SearchJob(source, source_keywords(source, index)))
    for source in sources.urls:
        jobs.append(_UrlJob(source, read_url_list(source.csv)))
    for index, source in enumerate(sources.folders):
        if not Path(source.path).is_dir():
            raise FileNotFoundError(f"sources.folders[{index}].path is not a folder: {source.path}")
        jobs.append(_FolderJob(source, folder_grouper(source, index), folder_generators(source)))
    return jobs


def check_sources(sources: SourcesConfig) -> None:
    """Check every source as a crawl does before it fetches anything: keywords, URL lists, folders, groupings.

    Raises ValueError or FileNotFoundError naming the source and the file; reads local files only.
    """
    _plan(sources)


def _run_job(state: CrawlState, sources: SourcesConfig, job: _SearchJob | _UrlJob | _FolderJob) -> None:
    if isinstance(job, _SearchJob):
        for keyword in progress(job.keywords, len(job.keywords), f"crawl {job.source.engine}", unit="keyword"):
            _crawl_keyword(state, sources, job, keyword)
            state.checkpoint(force=True)
    elif isinstance(job, _UrlJob):
        _crawl_url_list(state, sources, job)
    else:
        _crawl_folder(state, job)
    state.checkpoint(force=True)


def _as_utc(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    return now.replace(tzinfo=UTC) if now.tzinfo is None else now.astimezone(UTC)


def _due_jobs(
    jobs: list[_SearchJob | _UrlJob | _FolderJob], searches: pd.DataFrame, now: datetime, hours: float
) -> tuple[list[_SearchJob | _UrlJob | _FolderJob], list[tuple[str, str]]]:
    """The jobs with only the keywords due for a search again, and the (source, keyword) pairs left out."""
    due_jobs: list[_SearchJob | _UrlJob | _FolderJob] = []
    not_due: list[tuple[str, str]] = []
    for job in jobs:
        if isinstance(job, _SearchJob):
            name = f"search:{job.source.engine}"
            due, recent = due_keywords(searches, name, job.keywords, now, hours)
            not_due += [(name, keyword) for keyword in recent]
            job = _SearchJob(job.source, due)
        due_jobs.append(job)
    return due_jobs, not_due


def crawl_sources(workspace: Workspace, sources: SourcesConfig, now: datetime | None = None) -> CrawlResult:
    """Fetch new files from every source into incoming/; return the cumulative log and a per-keyword summary.

    `now` (UTC; naive means UTC) stamps this run's rows. The log is persisted after each keyword and source and
    at the end, also when a source raises. A keyword searched (on the same engine) less than
    sources.recrawl_after_hours before `now` is not searched again; URLs fetched once are never fetched again.
    """
    stamp = _as_utc(now)
    searches = read_searches(workspace)
    try:
        planned = _plan(sources)
    except ValueError as error:  # keywords, URL lists, group CSVs and patterns name what is wrong
        raise SourceError(str(error)) from None
    jobs, not_due = _due_jobs(planned, searches, stamp, sources.recrawl_after_hours)
    if not_due:
        hours = sources.recrawl_after_hours
        log.info("crawl: %d keyword(s) searched within %g h are not searched again", len(not_due), hours)
    state = CrawlState(workspace, read_crawl_log(workspace), stamp)
    try:
        for job in jobs:
            _run_job(state, sources, job)
    finally:
        state.checkpoint(force=True)
    summary = state.summary()
    _record_searches(workspace, searches, summary, stamp)
    log.info(
        "crawl: new=%d skipped=%d failed=%d", summary["new"].sum(), summary["skipped"].sum(), summary["failed"].sum()
    )
    return CrawlResult(state.log_frame(), summary, not_due)
