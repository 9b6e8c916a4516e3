"""Crawler health: flag keywords that returned nothing or mostly failures, and count per engine and keyword.

icrawler's parsers break silently when a search site changes its HTML (Google's does, often): the crawl then
"succeeds" with zero results. `keyword_health` turns a crawl summary (crawl_state.SUMMARY_COLUMNS) into one row per
keyword with a flag; `engine_counts` / `keyword_counts` give flat metrics to log every run, so a broken engine
shows up as a drop across runs; `fallback_plan` / `fallback_sources` build search sources that retry the flagged
keywords with each source's `fallback_engine`, keeping the filters that engine supports and naming the others.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, field

import pandas as pd

from pipeline_lib.acquire.engines import portable_filters
from pipeline_lib.acquire.sources import source_keywords
from pipeline_lib.core.config import SearchSource, SourcesConfig

log = logging.getLogger(__name__)

SUMMARY_NEEDS: tuple[str, ...] = ("source", "keyword", "new", "skipped", "failed")
HEALTH_COLUMNS: tuple[str, ...] = (
    "source",
    "engine",
    "keyword",
    "new",
    "skipped",
    "failed",
    "results",
    "flag",
    "message",
)
FLAG_OK = "ok"
FLAG_NO_RESULTS = "no_results"  # the search page listed nothing (or the parser could not read it)
FLAG_FEW_RESULTS = "few_results"
FLAG_FAILING = "failing"  # downloads mostly failed
SEARCH_PREFIX = "search:"
SLUG_LIMIT = 64  # characters of a keyword in a metric name (MLflow allows 250 for the whole key)


def engine_of(source: str) -> str:
    """'search:bing' -> 'bing'; other sources by kind: 'urls:list.csv' -> 'urls', 'folder:x' -> 'folder'."""
    text = str(source)
    if text.startswith(SEARCH_PREFIX):
        return text[len(SEARCH_PREFIX) :]
    return text.split(":", 1)[0] or "unknown"


def _check_summary(summary: pd.DataFrame) -> pd.DataFrame:
    missing = [c for c in SUMMARY_NEEDS if c not in summary.columns]
    if missing:
        raise ValueError(
            f"crawl summary is missing columns: {', '.join(missing)} (expected crawl_state.SUMMARY_COLUMNS)"
        )
    frame = summary.reset_index(drop=True).copy()
    for name in ("new", "skipped", "failed"):
        frame[name] = pd.to_numeric(frame[name], errors="raise").fillna(0).astype("int64")
    if "error" not in frame.columns:
        frame["error"] = ""
    frame["error"] = frame["error"].astype("string").fillna("")
    return frame


def _flag(results: int, failed: int, error: str, min_results: int, max_failed_share: float) -> tuple[str, str]:
    attempts = results + failed
    if failed and failed / attempts > max_failed_share:
        return FLAG_FAILING, f"{failed} of {attempts} downloads failed" + (f" ({error})" if error else "")
    if results == 0:
        return FLAG_NO_RESULTS, "no results" + (f": {error}" if error and error != "no results" else "") + (
            " (parser broken or keyword too narrow?)"
        )
    if results < min_results:
        return FLAG_FEW_RESULTS, f"only {results} result(s), fewer than {min_results}"
    return FLAG_OK, error


def keyword_health(summary: pd.DataFrame, min_new_or_seen: int = 1, max_failed_share: float = 0.5) -> pd.DataFrame:
    """One row per summary row (HEALTH_COLUMNS): results = new + skipped; flag ok / no_results / few_results / failing.

    failing: more than max_failed_share of the attempted downloads failed; no_results: nothing new and nothing
    already seen; few_results: fewer than min_new_or_seen results.
    """
    if min_new_or_seen < 1:
        raise ValueError(f"min_new_or_seen must be >= 1, got {min_new_or_seen}")
    if not 0 <= max_failed_share < 1:
        raise ValueError(f"max_failed_share must be in [0, 1), got {max_failed_share}")
    frame = _check_summary(summary)
    rows = []
    for row in frame.itertuples(index=False):
        results = int(row.new) + int(row.skipped)
        flag, message = _flag(results, int(row.failed), str(row.error), min_new_or_seen, max_failed_share)
        rows.append(
            {
                "source": str(row.source),
                "engine": engine_of(row.source),
                "keyword": str(row.keyword),
                "new": int(row.new),
                "skipped": int(row.skipped),
                "failed": int(row.failed),
                "results": results,
                "flag": flag,
                "message": message,
            }
        )
        if flag != FLAG_OK:
            log.warning("crawl health: %s %r: %s", row.source, row.keyword, message)
    return pd.DataFrame(rows, columns=list(HEALTH_COLUMNS))


def flagged(health: pd.DataFrame) -> pd.DataFrame:
    """The rows of keyword_health that are not ok."""
    return health[health["flag"] != FLAG_OK].reset_index(drop=True)


def metric_slug(text: str, limit: int = SLUG_LIMIT) -> str:
    """A keyword as an MLflow-safe metric name part: word characters, '-' and '.'; others become '_'.

    At most `limit` characters: a longer one is cut and ends in 8 hex digits of its hash (still unique).
    """
    slug = re.sub(r"[^\w\-.]+", "_", str(text).strip(), flags=re.UNICODE).strip("_") or "_"
    if len(slug) <= limit:
        return slug
    tag = hashlib.sha256(str(text).encode("utf-8")).hexdigest()[:8]
    return f"{slug[: limit - 9]}-{tag}"


def engine_counts(summary: pd.DataFrame) -> dict[str, float]:
    """crawl.engine.<engine>.{new,skipped,failed,keywords,empty_keywords} summed over the run's keywords."""
    health = keyword_health(summary)
    metrics: dict[str, float] = {}
    for engine, rows in health.groupby("engine", sort=True):
        prefix = f"crawl.engine.{metric_slug(engine)}"
        for name in ("new", "skipped", "failed"):
            metrics[f"{prefix}.{name}"] = float(rows[name].sum())
        metrics[f"{prefix}.keywords"] = float(len(rows))
        metrics[f"{prefix}.empty_keywords"] = float((rows["results"] == 0).sum())
    return metrics


def keyword_counts(summary: pd.DataFrame) -> dict[str, float]:
    """crawl.keyword.<engine>.<keyword>.{results,failed} per keyword (summed if a keyword repeats)."""
    health = keyword_health(summary)
    metrics: dict[str, float] = {}
    for row in health.itertuples(index=False):
        prefix = f"crawl.keyword.{metric_slug(row.engine)}.{metric_slug(row.keyword)}"
        metrics[f"{prefix}.results"] = metrics.get(f"{prefix}.results", 0.0) + row.results
        metrics[f"{prefix}.failed"] = metrics.get(f"{prefix}.failed", 0.0) + row.failed
    return metrics


@dataclass(frozen=True)
class Fallback:
    """A retry of a source's empty keywords on its fallback engine, and the filters that engine cannot take."""

    source: SearchSource
    engine: str  # the engine it stands in for
    dropped: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        """A note for the run: the keywords retried, the filters kept and those dropped."""
        kept = ", ".join(f"{k}={v}" for k, v in self.source.filters.items()) or "none"
        text = (
            f"crawl health: retried {len(self.source.keywords)} keyword(s) with no results on {self.engine} "
            f"with the fallback engine {self.source.engine}; filters kept: {kept}"
        )
        if self.dropped:
            dropped = ", ".join(f"{k}={v}" for k, v in self.dropped.items())
            text += f"; dropped: {dropped} ({self.source.engine} does not support them)"
        return text


def _fallback(source: SearchSource, keywords: list[str]) -> Fallback:
    """The retry of keywords on source.fallback_engine with the filters that engine supports."""
    engine = str(source.fallback_engine)
    kept, dropped = portable_filters(dict(source.filters), engine)
    if dropped:
        log.warning("crawl health: fallback %s drops filters %s (unsupported there)", engine, dropped)
    retry = SearchSource(
        engine=engine,
        keywords=keywords,
        label=source.label,
        max_num=source.max_num,
        filters=kept,
        threads=source.threads,
        endpoint=source.fallback_endpoint,
        api_key=source.api_key if engine == "flickr" else None,
    )
    return Fallback(retry, source.engine, dropped)


def fallback_plan(health: pd.DataFrame, sources: SourcesConfig) -> list[Fallback]:
    """For each search source with a fallback_engine: a retry on that engine for its no_results keywords.

    The retry keeps label, max_num, threads and the filters the fallback engine supports (icrawler's vocabulary of
    that engine; the others are listed in Fallback.dropped); its endpoint is the source's fallback_endpoint.
    """
    empty = health[health["flag"] == FLAG_NO_RESULTS]
    out: list[Fallback] = []
    for index, source in enumerate(sources.search):
        if source.fallback_engine is None:
            continue
        mine = set(source_keywords(source, index))
        rows = empty[(empty["source"] == f"{SEARCH_PREFIX}{source.engine}") & empty["keyword"].isin(mine)]
        keywords = list(dict.fromkeys(rows["keyword"]))
        if not keywords:
            continue
        log.info("crawl health: %d keyword(s) of %s -> %s", len(keywords), source.engine, source.fallback_engine)
        out.append(_fallback(source, keywords))
    return out


def fallback_sources(health: pd.DataFrame, sources: SourcesConfig) -> list[SearchSource]:
    """The retry sources of fallback_plan (see there)."""
    return [fallback.source for fallback in fallback_plan(health, sources)]
