"""Crawler health: zero-result and failing keywords are flagged; counts per engine and keyword; fallback sources."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from pipeline_lib.acquire.crawl import crawl_sources
from pipeline_lib.assess.health import (
    HEALTH_COLUMNS,
    engine_counts,
    engine_of,
    fallback_plan,
    fallback_sources,
    flagged,
    keyword_counts,
    keyword_health,
    metric_slug,
)
from pipeline_lib.core.config import ConfigError, SearchSource, SourcesConfig
from pipeline_lib.core.config_loader import build_config
from pipeline_lib.core.workspace import Workspace
from tests.conftest import make_image
from tests.loopback import REQUEST_TIMEOUT_S, LoopbackSite, google_result_page


def summary(rows: list[tuple[str, str, int, int, int, str]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["source", "keyword", "new", "skipped", "failed", "error"])


def test_flags_zero_results_failures_and_few_results() -> None:
    table = summary(
        [
            ("search:bing", "cats", 8, 2, 0, ""),
            ("search:google", "dogs", 0, 0, 0, "search page unparsable: no image URLs found by google parser"),
            ("search:bing", "old", 0, 5, 0, ""),  # nothing new but seen before: healthy
            ("search:bing", "flaky", 1, 0, 3, "http 500"),
            ("search:bing", "rare", 1, 0, 0, ""),
            ("urls:list.csv", "p1", 0, 0, 0, "no results"),
        ]
    )
    health = keyword_health(table, min_new_or_seen=2)
    assert list(health.columns) == list(HEALTH_COLUMNS)
    assert health["flag"].tolist() == ["ok", "no_results", "ok", "failing", "few_results", "no_results"]
    assert health["engine"].tolist() == ["bing", "google", "bing", "bing", "bing", "urls"]
    assert "google parser" in health.loc[1, "message"] and "3 of 4 downloads failed" in health.loc[3, "message"]
    assert flagged(health)["keyword"].tolist() == ["dogs", "flaky", "rare", "p1"]
    assert keyword_health(table)["flag"].tolist()[4] == "ok", "default threshold: one result is enough"


def test_counts_per_engine_and_keyword() -> None:
    table = summary(
        [
            ("search:bing", "cats", 8, 2, 1, ""),
            ("search:bing", "dogs", 0, 0, 0, "no results"),
            ("search:google", "山田 太郎", 3, 0, 0, ""),
        ]
    )
    engines = engine_counts(table)
    assert engines["crawl.engine.bing.new"] == 8 and engines["crawl.engine.bing.failed"] == 1
    assert engines["crawl.engine.bing.keywords"] == 2 and engines["crawl.engine.bing.empty_keywords"] == 1
    assert engines["crawl.engine.google.new"] == 3 and engines["crawl.engine.google.empty_keywords"] == 0
    keywords = keyword_counts(table)
    assert keywords["crawl.keyword.bing.cats.results"] == 10 and keywords["crawl.keyword.bing.dogs.results"] == 0
    assert keywords["crawl.keyword.google.山田_太郎.results"] == 3
    assert metric_slug("a/b c?") == "a_b_c" and engine_of("folder:ai") == "folder"


def test_bad_summary_is_named() -> None:
    with pytest.raises(ValueError, match="missing columns: failed"):
        keyword_health(pd.DataFrame({"source": [], "keyword": [], "new": [], "skipped": []}))
    with pytest.raises(ValueError, match="min_new_or_seen"):
        keyword_health(summary([]), min_new_or_seen=0)


def test_a_keyword_the_loopback_search_page_lists_nothing_for_is_flagged(workspace: Workspace, tmp_path: Path) -> None:
    images = {f"{i}.jpg": make_image(tmp_path / f"{i}.jpg", seed=i).read_bytes() for i in range(2)}
    site = LoopbackSite(images)
    site.listing = {"cats": list(images), "unicorns": []}
    with site.serve() as endpoint:
        sources = SourcesConfig.model_validate(
            {
                "allow_private_addresses": True,
                "request_timeout_s": REQUEST_TIMEOUT_S,
                "max_retries": 0,
                "search": [
                    {
                        "engine": "bing",
                        "endpoint": endpoint,
                        "keywords": ["cats", "unicorns"],
                        "threads": 2,
                        "fallback_engine": "baidu",
                    }
                ],
            }
        )
        result = crawl_sources(workspace, sources)
    health = keyword_health(result.summary).set_index("keyword")
    assert health.loc["cats", "flag"] == "ok" and health.loc["cats", "new"] == 2
    assert health.loc["unicorns", "flag"] == "no_results"
    assert engine_counts(result.summary)["crawl.engine.bing.empty_keywords"] == 1
    retry = fallback_sources(keyword_health(result.summary), sources)
    assert retry == [SearchSource(engine="baidu", keywords=["unicorns"], label="real", max_num=10, threads=2)]


def test_fallback_engine_config_validation() -> None:
    with pytest.raises(ConfigError, match="fallback_engine must differ"):
        build_config({"sources": {"search": [{"engine": "bing", "keywords": ["a"], "fallback_engine": "bing"}]}})
    with pytest.raises(ConfigError, match="needs api_key"):
        build_config({"sources": {"search": [{"keywords": ["a"], "fallback_engine": "flickr"}]}})
    no_fallback = SourcesConfig(search=[SearchSource(keywords=["x"])])
    assert fallback_sources(keyword_health(summary([("search:bing", "x", 0, 0, 0, "")])), no_fallback) == []


def test_fallback_keeps_the_filters_its_engine_supports_and_names_the_dropped(
    workspace: Workspace, tmp_path: Path
) -> None:
    images = {f"{i}.jpg": make_image(tmp_path / f"{i}.jpg", seed=i).read_bytes() for i in range(2)}
    google, bing = LoopbackSite(images, page=google_result_page), LoopbackSite(images)
    google.listing = {"cats": list(images), "unicorns": []}  # Google lists nothing for unicorns
    with google.serve() as google_endpoint, bing.serve() as bing_endpoint:
        search = {
            "engine": "google",
            "endpoint": google_endpoint.replace("first=", "start="),
            "keywords": ["cats", "unicorns"],
            "filters": {"type": "photo", "color": "color", "size": ">4mp"},
            "threads": 2,
            "fallback_engine": "bing",
            "fallback_endpoint": bing_endpoint,
        }
        settings = {"allow_private_addresses": True, "request_timeout_s": REQUEST_TIMEOUT_S, "max_retries": 0}
        sources = SourcesConfig.model_validate(settings | {"search": [search]})
        first = crawl_sources(workspace, sources)
        plan = fallback_plan(keyword_health(first.summary), sources)
        assert len(plan) == 1 and plan[0].source.keywords == ["unicorns"] and plan[0].engine == "google"
        assert plan[0].source.filters == {"type": "photo", "color": "color"}
        assert plan[0].dropped == {"size": ">4mp"}
        retry = sources.model_copy(update={"search": [plan[0].source]})
        again = crawl_sources(workspace, retry)
    assert bing.queries == ["unicorns"]
    assert bing.search_paths[0].endswith("&qft=+filterui:photo-photo+filterui:color2-color"), bing.search_paths
    unicorns = again.summary.set_index("keyword").loc["unicorns"]
    assert unicorns["new"] + unicorns["skipped"] == 2  # the same bytes as Google's cats: already held
    note = plan[0].describe()
    assert "filters kept: type=photo, color=color" in note and "dropped: size=>4mp (bing does not support them)" in note
    assert fallback_sources(keyword_health(first.summary), sources) == [plan[0].source]


def test_metric_names_from_long_keywords_are_bounded_and_stay_unique() -> None:
    long_a, long_b = "a" * 220, "a" * 219 + "b"
    slug_a, slug_b = metric_slug(long_a), metric_slug(long_b)
    assert len(slug_a) == len(slug_b) == 64 and slug_a != slug_b
    assert metric_slug("short name") == "short_name"
