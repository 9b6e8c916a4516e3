"""The crawl planner with real icrawler against loopback servers: whole crawls, incremental runs, keywords without
results, a source that fails or raises midway."""

from __future__ import annotations

from typing import Any

import pandas as pd
import pytest

from pipeline_lib.acquire import crawl
from pipeline_lib.acquire.crawl import crawl_sources
from pipeline_lib.acquire.crawl_log import read_crawl_log
from pipeline_lib.acquire.ingest import LOG_COLUMNS, ingest
from pipeline_lib.core.config import IngestConfig
from pipeline_lib.core.config_loader import build_config
from pipeline_lib.core.workspace import Workspace, file_sha256
from pipeline_lib.ops.demo_data import DemoDataset, demo_config_dict, search_site
from tests.acquire.crawl_helpers import NOW, bing, incoming, loopback_sources, served_urls
from tests.loopback import REQUEST_TIMEOUT_S, closed_port_url

DEAD_ENDPOINT = "images/async?q={keyword}&first={offset}"  # on a port where nothing listens


def test_first_crawl_fetches_everything_and_second_crawl_nothing(workspace: Workspace, dataset: DemoDataset) -> None:
    with search_site(dataset) as endpoint:
        config = build_config(demo_config_dict(dataset, endpoint, workspace.root))
        sources = config.sources.model_copy(update={"request_timeout_s": REQUEST_TIMEOUT_S})
        first = crawl_sources(workspace, sources, now=NOW)
        web = first.log[first.log["source"] == "search:bing"]
        assert set(web["url"]) == served_urls(dataset, endpoint, dataset.keywords)
        assert (web["error"] == "").all() and (web["sha256"] != "").all()
        assert set(web["label"]) == {"real"} and set(web["generator"]) == {"camera"}
        assert (web["keyword"] == web["group"]).all()
        for row in first.log.itertuples():
            assert file_sha256(incoming(workspace, row.sha256, row.ext)) == row.sha256
        assert (first.log["fetched_at"] == pd.Timestamp(NOW)).all()
        assert first.summary["new"].sum() > 0 and (first.summary["error"] == "").all()
        assert first.summary["new"].sum() + first.summary["skipped"].sum() == len(first.log)
        on_disk = read_crawl_log(workspace)
        pd.testing.assert_frame_equal(on_disk, first.log)
        assert str(on_disk["fetched_at"].dtype) == "datetime64[ns, UTC]" and str(on_disk["n_bytes"].dtype) == "int64"

        second = crawl_sources(workspace, sources)
        assert second.summary["new"].sum() == 0
        assert second.summary["skipped"].sum() == first.summary["new"].sum() + first.summary["skipped"].sum()
        assert len(second.log) == len(first.log)

    # the corrupt files arrived too, and ingest quarantines them
    catalog = ingest(workspace, second.log, IngestConfig(min_side=32))
    invalid = catalog[catalog["status"].str.startswith("invalid:")]
    assert len(invalid) == dataset.n_corrupt
    assert set(LOG_COLUMNS) <= set(second.log.columns)


def test_keyword_without_results_is_a_summary_row(workspace: Workspace, dataset: DemoDataset) -> None:
    with search_site(dataset) as endpoint:
        result = crawl_sources(workspace, loopback_sources(search=[bing(endpoint, ["nobody-at-all", "person-02"])]))
    rows = result.summary.set_index("keyword")
    assert rows.loc["nobody-at-all", "new"] == 0 and rows.loc["nobody-at-all", "error"] == "no results"
    assert rows.loc["person-02", "new"] > 0 and rows.loc["person-02", "error"] == ""


def test_network_loss_keeps_what_was_fetched(workspace: Workspace, dataset: DemoDataset) -> None:
    dead = closed_port_url(DEAD_ENDPOINT)
    with search_site(dataset) as endpoint:
        broken = loopback_sources(search=[bing(endpoint, ["person-01"]), bing(dead, ["person-02"])])
        first = crawl_sources(workspace, broken)
        rows = first.summary.set_index("keyword")
        assert rows.loc["person-01", "new"] > 0
        assert rows.loc["person-02", "new"] == 0 and "search page failed" in rows.loc["person-02", "error"]
        kept = read_crawl_log(workspace)
        assert set(kept["url"]) == served_urls(dataset, endpoint, ["person-01"])

        healthy = loopback_sources(search=[bing(endpoint, ["person-01", "person-02"])])
        second = crawl_sources(workspace, healthy)
    rows = second.summary.set_index("keyword")
    assert rows.loc["person-01", "new"] == 0 and rows.loc["person-01", "skipped"] == len(kept)
    assert rows.loc["person-02", "new"] > 0
    assert set(second.log["url"]) == served_urls(dataset, endpoint, ["person-01", "person-02"])


def test_log_is_persisted_when_a_source_raises(
    workspace: Workspace, dataset: DemoDataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    def explode(*args: Any) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(crawl, "crawl_folder", explode)
    with search_site(dataset) as endpoint:
        folders = [{"path": dataset.ai_dir, "label": "ai"}]
        sources = loopback_sources(search=[bing(endpoint, ["person-03"])], folders=folders)
        with pytest.raises(RuntimeError, match="disk on fire"):
            crawl_sources(workspace, sources)
        assert set(read_crawl_log(workspace)["url"]) == served_urls(dataset, endpoint, ["person-03"])
