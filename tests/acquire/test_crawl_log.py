"""The crawl log and the search log: written and read back whole, damage named, and keywords searched again only
after sources.recrawl_after_hours."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from pipeline_lib.acquire import crawl_log
from pipeline_lib.acquire.crawl import crawl_sources
from pipeline_lib.acquire.crawl_log import CrawlLogError, crawl_log_path, read_crawl_log, write_crawl_log
from pipeline_lib.core.workspace import Workspace
from pipeline_lib.ops.demo_data import DemoDataset, search_site
from tests.acquire.crawl_helpers import NOW, bing, jpeg, loopback_sources
from tests.loopback import LoopbackSite, closed_port_url


def test_the_log_is_written_and_read_back_with_its_dtypes_and_damage_is_named(workspace: Workspace) -> None:
    assert read_crawl_log(workspace).empty, "no log yet: an empty one"
    row = {"url": "http://h/a.jpg", "source": "urls:l.csv", "keyword": "g", "label": "real", "group": "g"}
    row |= {"generator": "camera", "fetched_at": NOW, "sha256": "a" * 64, "ext": "jpg", "n_bytes": 3, "error": ""}
    write_crawl_log(workspace, pd.DataFrame([row]))
    back = read_crawl_log(workspace)
    assert back.to_dict("records") == [row | {"fetched_at": pd.Timestamp(NOW)}]
    assert str(back["fetched_at"].dtype) == "datetime64[ns, UTC]" and str(back["n_bytes"].dtype) == "int64"

    pd.DataFrame([row]).drop(columns=["sha256"]).to_parquet(crawl_log_path(workspace))
    with pytest.raises(CrawlLogError, match=r"log.parquet: crawl log is missing columns \['sha256'\]"):
        read_crawl_log(workspace)
    crawl_log_path(workspace).write_bytes(b"not parquet")
    with pytest.raises(CrawlLogError, match="log.parquet is unreadable .*doctor --repair"):
        read_crawl_log(workspace)


def test_a_keyword_is_searched_again_only_after_recrawl_after_hours(workspace: Workspace, tmp_path: Path) -> None:
    site = LoopbackSite({"0.jpg": jpeg(tmp_path, 0)})
    keywords = tmp_path / "names.txt"
    keywords.write_text("alice\n", encoding="utf-8")
    sources = loopback_sources(search=[bing("", [], keywords_file=keywords)], recrawl_after_hours=20)
    with site.serve() as endpoint:
        sources = sources.model_copy(update={"search": [sources.search[0].model_copy(update={"endpoint": endpoint})]})
        crawl_sources(workspace, sources, now=NOW)
        searched = pd.read_parquet(crawl_log.searches_path(workspace))
        assert searched[["source", "keyword"]].values.tolist() == [["search:bing", "alice"]]

        # 19 h later, a name added to the file: only the new name is searched, the log file is not rewritten
        keywords.write_text("alice\nbob\n", encoding="utf-8")
        log_stamp = crawl_log_path(workspace).stat().st_mtime_ns
        later = crawl_sources(workspace, sources, now=NOW + pd.Timedelta(hours=19))
        assert site.queries == ["alice", "bob"], site.queries
        assert later.not_due == [("search:bing", "alice")]
        assert crawl_log_path(workspace).stat().st_mtime_ns == log_stamp, "nothing new: the log is not rewritten"

        # 21 h after the first search (a daily schedule with slack): alice is due again, bob not yet
        next_day = crawl_sources(workspace, sources, now=NOW + pd.Timedelta(hours=21))
    assert site.queries == ["alice", "bob", "alice"], site.queries
    assert next_day.not_due == [("search:bing", "bob")]
    stamps = pd.read_parquet(crawl_log.searches_path(workspace)).set_index("keyword")["searched_at"]
    assert stamps["alice"] == pd.Timestamp(NOW + pd.Timedelta(hours=21)), stamps
    assert stamps["bob"] == pd.Timestamp(NOW + pd.Timedelta(hours=19)), stamps


def test_a_failed_search_is_not_stamped_and_is_tried_again(workspace: Workspace, dataset: DemoDataset) -> None:
    dead = closed_port_url("images/async?q={keyword}&first={offset}")
    sources = loopback_sources(search=[bing(dead, ["person-01"])], recrawl_after_hours=20)
    first = crawl_sources(workspace, sources, now=NOW)
    assert "search page failed" in first.summary.iloc[0]["error"]
    assert not crawl_log.searches_path(workspace).exists(), "a search that failed must not wait recrawl_after_hours"
    with search_site(dataset) as endpoint:
        healthy = loopback_sources(search=[bing(endpoint, ["person-01"])], recrawl_after_hours=20)
        second = crawl_sources(workspace, healthy, now=NOW + pd.Timedelta(minutes=5))
    assert second.not_due == [] and second.summary.iloc[0]["new"] > 0


def test_due_keywords_boundaries() -> None:
    searches = pd.DataFrame(
        {"source": ["search:bing", "search:google"], "keyword": ["a", "b"], "searched_at": [pd.Timestamp(NOW)] * 2}
    ).astype(crawl_log.SEARCH_COLUMNS)
    at = NOW + pd.Timedelta(hours=20)
    assert crawl_log.due_keywords(searches, "search:bing", ["a", "b"], at, 20) == (["a", "b"], [])
    assert crawl_log.due_keywords(searches, "search:bing", ["a", "b"], at, 20.5) == (["b"], ["a"])
    assert crawl_log.due_keywords(searches, "search:google", ["a", "b"], at, 21) == (["a"], ["b"])
    assert crawl_log.due_keywords(searches, "search:bing", ["a"], NOW, 0) == (["a"], []), "0 h: every crawl searches"
