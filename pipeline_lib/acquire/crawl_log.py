"""The crawl log and the search log: their columns, reading and writing them, and which keywords are due.

crawl/log.parquet holds every URL ever tried (sha256 and ext of the bytes, or the error); crawl/searches.parquet
the last time each (search source, keyword) was searched, so that a keyword is searched again only after
sources.recrawl_after_hours. Both are written atomically.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pandas as pd

from pipeline_lib.core.workspace import Workspace, atomic_path

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
SEARCHES_FILE = "searches.parquet"
SEARCH_COLUMNS: dict[str, str] = {"source": "string", "keyword": "string", "searched_at": "datetime64[ns, UTC]"}
NO_RESULTS = "no results"  # the summary error of a keyword whose search listed nothing (it counts as searched)


class CrawlLogError(ValueError):
    """The crawl log is unreadable or not a crawl log; the message names the file."""


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


def record_searches(workspace: Workspace, previous: pd.DataFrame, summary: pd.DataFrame, now: datetime) -> None:
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
