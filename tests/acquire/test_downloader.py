"""icrawler run with the workspace downloader: many threads over one pooled connection each, every file written
once, and max_num counted per keyword (URLs fetched before count towards it)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from pipeline_lib.acquire.crawl import crawl_sources
from pipeline_lib.core.config import UrlListSource
from pipeline_lib.core.workspace import Workspace, bytes_sha256
from tests.acquire.crawl_helpers import bing, jpeg, jpegs, loopback_sources, no_half_written_files
from tests.loopback import LoopbackSite


def test_many_threads_write_every_file_exactly_once_whole_over_one_connection_each(
    workspace: Workspace, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    distinct = {f"{i}.jpg": jpeg(tmp_path, i) for i in range(96)}
    copies = {f"copy{i}.jpg": distinct[f"{i}.jpg"] for i in range(96)}  # the same bytes under a second URL
    site = LoopbackSite(distinct | copies)
    threads = 32
    with site.serve() as endpoint:
        base = endpoint.split("/search")[0]
        listing = tmp_path / "list.csv"
        listing.write_text("url,label,group\n" + "".join(f"{base}/img/{n},real,g\n" for n in site.images))
        with caplog.at_level(logging.WARNING, logger="urllib3"):
            result = crawl_sources(workspace, loopback_sources(urls=[UrlListSource(csv=listing, threads=threads)]))
    by_sha = {bytes_sha256(data): data for data in distinct.values()}
    files = [path for path in workspace.incoming.rglob("*") if path.is_file()]
    assert sorted(path.stem for path in files) == sorted(by_sha), "every distinct file exactly once"
    for path in files:
        assert path.read_bytes() == by_sha[path.stem] and path.parent.name == path.stem[:2]
    no_half_written_files(workspace)
    assert result.summary[["new", "skipped", "failed"]].sum().tolist() == [96, 96, 0]
    names = result.log["url"].str.rsplit("/", n=1).str[1]
    assert sorted(names) == sorted(site.images)
    assert [bytes_sha256(site.images[name]) for name in names] == result.log["sha256"].tolist()
    assert len(site.connections) <= threads + 1, "the connection pool keeps one connection per thread"
    assert not [r for r in caplog.records if "pool is full" in r.getMessage()], "no connection was discarded"


def test_max_num_limits_each_keyword(workspace: Workspace, tmp_path: Path) -> None:
    site = LoopbackSite(jpegs(tmp_path, 6))
    with site.serve() as endpoint:
        # three threads race for six URLs: exactly max_num downloads, whichever threads win
        first = crawl_sources(workspace, loopback_sources(search=[bing(endpoint, ["a"], max_num=2, threads=3)]))
        assert first.summary[["new", "skipped", "failed"]].values.tolist() == [[2, 0, 0]]
        assert sum(site.hits.values()) == 2, site.hits
        # a second keyword lists those two first: one thread takes them in order, and they use up its max_num
        fetched = first.log["url"].str.rsplit("/", n=1).str[1].tolist()
        site.listing = {"b": fetched + [name for name in site.images if name not in fetched]}
        second = crawl_sources(workspace, loopback_sources(search=[bing(endpoint, ["b"], max_num=2, threads=1)]))
    assert second.summary[["new", "skipped", "failed"]].values.tolist() == [[0, 2, 0]]
    assert sum(site.hits.values()) == 2, "URLs fetched before are not fetched again, and nothing past max_num"
    assert len([path for path in workspace.incoming.rglob("*") if path.is_file()]) == 2
