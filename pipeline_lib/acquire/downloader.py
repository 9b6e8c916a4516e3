"""Running icrawler with our downloader: every URL fetched through fetch_bytes (checked, pinned, retried) and
logged into a CrawlState, at most max_num per keyword, over one pooled connection per downloader thread.

_Crawler polls its feeder, parser and downloader threads and checkpoints the crawl log while they run.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable
from typing import Any

from icrawler import Crawler, ImageDownloader
from icrawler.storage import BaseStorage

from pipeline_lib.acquire.crawl_state import CrawlState, Origin
from pipeline_lib.acquire.fetch import fetch_bytes
from pipeline_lib.acquire.safety import pin_session
from pipeline_lib.core.config import SourcesConfig

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.05
QUEUE_TIMEOUT_S = 0.05  # how long an idle downloader thread waits before it checks whether the parsers are done


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


def run_crawler(
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
    """Build an icrawler Crawler with our downloader and run it to the end (rewrite: see engines._PageSession)."""
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
