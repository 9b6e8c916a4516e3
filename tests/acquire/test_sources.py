"""Keywords and URL lists: read from the user's UTF-8 files (.txt, .csv), merged, checked with file and line in
every error, and crawled with their labels and groups."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline_lib.acquire import sources
from pipeline_lib.acquire.crawl import crawl_sources
from pipeline_lib.acquire.crawl_log import crawl_log_path, read_crawl_log
from pipeline_lib.core.config import SearchSource, UrlListSource
from pipeline_lib.core.workspace import Workspace
from pipeline_lib.ops.demo_data import DemoDataset, search_site
from tests.acquire.crawl_helpers import bing, jpeg, loopback_sources
from tests.loopback import LoopbackSite


def test_japanese_keyword_from_a_keywords_file_round_trips(workspace: Workspace, tmp_path: Path) -> None:
    keywords = tmp_path / "names.txt"
    keywords.write_text("# people\n山田太郎\n\n  \n", encoding="utf-8")
    site = LoopbackSite({"0.jpg": jpeg(tmp_path, 0)})
    with site.serve() as endpoint:
        crawl_sources(workspace, loopback_sources(search=[bing(endpoint, [], keywords_file=keywords)]))
    assert site.queries == ["山田太郎"]
    stored = read_crawl_log(workspace)
    assert stored["keyword"].tolist() == ["山田太郎"] and stored["group"].tolist() == ["山田太郎"]


def test_keywords_from_csv_and_inline_are_merged(tmp_path: Path) -> None:
    path = tmp_path / "names.csv"
    path.write_text("keyword,notes\n山田 花子,x\nNaomi Osaka,y\n,z\n", encoding="utf-8")
    source = SearchSource(keywords=["Naomi Osaka", "A"], keywords_file=path)
    assert sources.source_keywords(source, 0) == ["Naomi Osaka", "A", "山田 花子"]
    (tmp_path / "bad.csv").write_text("name\nx\n", encoding="utf-8")
    with pytest.raises(ValueError, match="bad.csv has no 'keyword' column"):
        sources.read_keywords(tmp_path / "bad.csv")


def test_missing_keywords_file_is_named(workspace: Workspace, tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        crawl_sources(workspace, loopback_sources(search=[{"keywords_file": missing}]))


def test_url_list_is_fetched_with_labels_and_groups(workspace: Workspace, dataset: DemoDataset, tmp_path: Path) -> None:
    with search_site(dataset) as endpoint:
        base = endpoint.split("/images/")[0]
        listing = tmp_path / "list.csv"
        listing.write_text(
            "url,label,group\n"
            f"{base}/img/person-01/01.jpg,real,alice\n"
            f"{base}/img/person-02/01.jpg,ai,bob\n"
            f"{base}/img/person-02/missing.jpg,ai,bob\n",
            encoding="utf-8",
        )
        result = crawl_sources(workspace, loopback_sources(urls=[UrlListSource(csv=listing)]))
    rows = result.log.set_index(result.log["url"].str.rsplit("/", n=1).str[1])
    assert rows.loc["01.jpg"].shape[0] == 2
    by_group = result.log.set_index("group")
    assert by_group.loc["alice", "label"] == "real" and by_group.loc["alice", "generator"] == "camera"
    assert set(result.log["source"]) == {"urls:list.csv"}
    assert set(result.log.loc[result.log["group"] == "bob", "label"]) == {"ai"}
    assert rows.loc["missing.jpg", "error"] == "http 404"
    summary = result.summary.set_index("keyword")
    assert summary.loc["alice", "new"] == 1 and summary.loc["bob", "new"] == 1 and summary.loc["bob", "failed"] == 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("url,label\nhttp://a/x.jpg,real\n", r"list.csv, line 1: missing column\(s\) group"),
        ("url,label,group\nhttp://a/x.jpg,real,g\nhttp://a/y.jpg,fake,g\n", r"list.csv, line 3: label 'fake'"),
        ("url,label,group\n,real,g\n", r"list.csv, line 2: empty url"),
    ],
)
def test_bad_url_list_names_file_and_line(workspace: Workspace, tmp_path: Path, text: str, message: str) -> None:
    listing = tmp_path / "list.csv"
    listing.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        crawl_sources(workspace, loopback_sources(urls=[UrlListSource(csv=listing)]))
    assert not crawl_log_path(workspace).exists()


def test_over_long_keywords_are_refused_with_where_they_came_from(workspace: Workspace, tmp_path: Path) -> None:
    long, endpoint = "x" * 220, "http://127.0.0.1:9/s?q={keyword}&first={offset}"
    with pytest.raises(ValueError, match=r"sources.search\[0\].keywords: keyword 'x+'\.\.\. is 220 characters"):
        crawl_sources(workspace, loopback_sources(search=[bing(endpoint, [long])]))
    keywords = tmp_path / "names.txt"
    keywords.write_text(f"fine\n{long}\n", encoding="utf-8")
    source = bing(endpoint, [], keywords_file=keywords)
    with pytest.raises(ValueError, match="names.txt: keyword .* the limit is 100"):
        crawl_sources(workspace, loopback_sources(search=[source]))
    urls = tmp_path / "urls.csv"
    urls.write_text(f"url,label,group\nhttp://127.0.0.1:9/a.jpg,real,{long}\n", encoding="utf-8")
    with pytest.raises(ValueError, match="urls.csv, line 2: keyword"):
        sources.read_url_list(urls)
    empty = tmp_path / "empty.txt"
    empty.write_text("# nobody yet\n", encoding="utf-8")
    with pytest.raises(ValueError, match="has no keywords .*empty.txt holds none"):
        crawl_sources(workspace, loopback_sources(search=[bing(endpoint, [], keywords_file=empty)]))
