"""Crawl: fetch images from search engines (icrawler), URL lists and local folders into incoming/.

The planner: every source is checked and turned into a job before anything is fetched (check_sources does only
that), keywords searched less than sources.recrawl_after_hours ago are left out, and each job runs in turn. Every
URL tried is appended to the cumulative crawl log (crawl_log.py), written atomically after each keyword/source,
periodically during long crawls and at the end even when a source raised.

The parts: crawl_log (the log files), crawl_state (one run's bookkeeping and bytes into incoming/), fetch (HTTP),
engines (search engines), downloader (running icrawler), sources (keywords, URL lists), folders (folder imports).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
from icrawler.builtin.urllist import PseudoParser, UrlListFeeder

from pipeline_lib.acquire.crawl_log import NO_RESULTS, due_keywords, read_crawl_log, read_searches, record_searches
from pipeline_lib.acquire.crawl_state import CrawlState, Origin
from pipeline_lib.acquire.downloader import run_crawler
from pipeline_lib.acquire.engines import ENGINES, FLICKR_API, check_search_source, search_kwargs
from pipeline_lib.acquire.folders import FolderJob, crawl_folder, folder_generators, folder_grouper
from pipeline_lib.acquire.sources import UrlEntry, read_url_list, source_keywords
from pipeline_lib.core.config import SearchSource, SourcesConfig, UrlListSource
from pipeline_lib.core.progress import progress
from pipeline_lib.core.workspace import Workspace

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CrawlResult:
    """The whole cumulative crawl log, one summary row per (source, keyword) of this run, and the (source, keyword)
    pairs not searched because they were searched less than sources.recrawl_after_hours ago."""

    log: pd.DataFrame
    summary: pd.DataFrame
    not_due: list[tuple[str, str]] = field(default_factory=list)


class SourceError(ValueError):
    """A source of the config is unusable (keywords, URL list, folder grouping); the message names it."""


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
    feeder_kwargs, parser_kwargs = search_kwargs(source, keyword)
    parser_kwargs |= {"req_timeout": sources.request_timeout_s, "max_retry": sources.max_retries + 1}
    # icrawler's Flickr components call the API at a fixed URL: a configured endpoint replaces it.
    rewrite = (FLICKR_API, source.endpoint) if source.engine == "flickr" and source.endpoint else None
    try:
        run_crawler(
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
        run_crawler(
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


def _plan(sources: SourcesConfig) -> list[_SearchJob | _UrlJob | FolderJob]:
    """Validate every source (keywords, CSVs, folders) before anything is fetched."""
    jobs: list[_SearchJob | _UrlJob | FolderJob] = []
    for index, source in enumerate(sources.search):
        check_search_source(source, index)
        jobs.append(_SearchJob(source, source_keywords(source, index)))
    for source in sources.urls:
        jobs.append(_UrlJob(source, read_url_list(source.csv)))
    for index, source in enumerate(sources.folders):
        if not Path(source.path).is_dir():
            raise FileNotFoundError(f"sources.folders[{index}].path is not a folder: {source.path}")
        jobs.append(FolderJob(source, folder_grouper(source, index), folder_generators(source)))
    return jobs


def check_sources(sources: SourcesConfig) -> None:
    """Check every source as a crawl does before it fetches anything: keywords, URL lists, folders, groupings.

    Raises ValueError or FileNotFoundError naming the source and the file; reads local files only.
    """
    _plan(sources)


def _run_job(state: CrawlState, sources: SourcesConfig, job: _SearchJob | _UrlJob | FolderJob) -> None:
    if isinstance(job, _SearchJob):
        for keyword in progress(job.keywords, len(job.keywords), f"crawl {job.source.engine}", unit="keyword"):
            _crawl_keyword(state, sources, job, keyword)
            state.checkpoint(force=True)
    elif isinstance(job, _UrlJob):
        _crawl_url_list(state, sources, job)
    else:
        crawl_folder(state, job)
    state.checkpoint(force=True)


def _as_utc(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    return now.replace(tzinfo=UTC) if now.tzinfo is None else now.astimezone(UTC)


def _due_jobs(
    jobs: list[_SearchJob | _UrlJob | FolderJob], searches: pd.DataFrame, now: datetime, hours: float
) -> tuple[list[_SearchJob | _UrlJob | FolderJob], list[tuple[str, str]]]:
    """The jobs with only the keywords due for a search again, and the (source, keyword) pairs left out."""
    due_jobs: list[_SearchJob | _UrlJob | FolderJob] = []
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
    record_searches(workspace, searches, summary, stamp)
    log.info(
        "crawl: new=%d skipped=%d failed=%d", summary["new"].sum(), summary["skipped"].sum(), summary["failed"].sum()
    )
    return CrawlResult(state.log_frame(), summary, not_due)
