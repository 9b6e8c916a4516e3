"""Search engines through icrawler against loopback sites: Bing, Google, Baidu and Flickr pages and APIs, pages
the parsers cannot read, each engine's settings and filters checked, search pages checked like downloads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pipeline_lib.acquire import engines
from pipeline_lib.acquire.crawl import crawl_sources
from pipeline_lib.core.workspace import Workspace
from tests.acquire.crawl_helpers import bing, incoming, jpeg, jpegs, loopback_sources
from tests.loopback import LoopbackSite, baidu_result_page, changed_google_page, google_result_page


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ({"engine": "google", "keywords": ["x"], "endpoint": "ftp://h/?q={keyword}&s={offset}"}, r"http\(s\) URL"),
        ({"engine": "google", "keywords": ["x"], "filters": {"type": "cartoon"}}, r"search\[0\].filters"),
        ({"engine": "bing", "keywords": ["x"], "endpoint": "http://h/?q={keyword}"}, r"search\[0\].endpoint"),
        ({"engine": "flickr", "keywords": ["x"]}, r"search\[0\].api_key"),
        ({"engine": "bing", "keywords": ["x"], "filters": {"colour": "red"}}, r"search\[0\].filters"),
        ({"engine": "bing", "keywords": []}, r"search\[0\] has no keywords"),
    ],
)
def test_bad_search_settings_are_named(workspace: Workspace, source: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        crawl_sources(workspace, loopback_sources(search=[source]))


def _google(endpoint: str, keywords: list[str], **kwargs: Any) -> dict[str, Any]:
    template = endpoint.replace("first=", "start=")
    return {"engine": "google", "endpoint": template, "keywords": keywords, "max_num": 10, "threads": 2} | kwargs


def test_google_parser_crawls_a_loopback_site(workspace: Workspace, tmp_path: Path) -> None:
    site = LoopbackSite(jpegs(tmp_path, 3), page=google_result_page)
    with site.serve() as endpoint:
        filters = {"type": "photo", "color": "color", "size": ">4mp"}
        source = _google(endpoint, ["山田 太郎"], filters=filters)
        result = crawl_sources(workspace, loopback_sources(search=[source]))
        base = endpoint.split("/search")[0]
    assert site.queries == ["山田 太郎"]
    assert site.search_paths[0].endswith("&start=0&tbs=itp:photo,ic:color,isz:lt,islt:4mp")
    assert set(result.log["url"]) == {f"{base}/img/{name}" for name in site.images}
    assert set(result.log["source"]) == {"search:google"} and set(result.log["keyword"]) == {"山田 太郎"}
    assert result.summary[["new", "skipped", "failed"]].values.tolist() == [[3, 0, 0]]
    assert result.summary["error"].tolist() == [""]
    for row in result.log.itertuples():
        assert incoming(workspace, row.sha256, row.ext).read_bytes() == site.images[row.url.rsplit("/", 1)[1]]
    assert sum(site.hits.values()) == 3, "thumbnails (no image suffix) must not be fetched"


def test_google_feeder_keeps_the_real_site_and_its_filters() -> None:
    feeder = engines.EndpointGoogleFeeder(1, None, None)
    feeder.feed("cat", 0, 150, filters={"type": "photo", "color": "color"})
    urls = [feeder.out_queue.get_nowait() for _ in range(feeder.out_queue.qsize())]
    assert len(urls) == 2 and all(u.startswith("https://www.google.com/search?q=cat&") for u in urls)
    assert "tbs=itp%3Aphoto%2Cic%3Acolor" in urls[0] and "start=100" in urls[1]


@pytest.mark.parametrize(
    ("page", "note"),
    [
        (changed_google_page, "search page unparsable: no image URLs found by google parser"),
        (lambda urls: '<html><script>var u = "http://127.0.0.1/img/\\xZZ.jpg";</script></html>', "UnicodeDecodeError"),
    ],
)
def test_google_page_the_parser_cannot_read_is_a_summary_note(
    workspace: Workspace, tmp_path: Path, page: Any, note: str
) -> None:
    site = LoopbackSite(jpegs(tmp_path, 2), page=page)
    with site.serve() as endpoint:
        result = crawl_sources(workspace, loopback_sources(search=[_google(endpoint, ["x", "y"])]))
    assert result.summary["keyword"].tolist() == ["x", "y"]
    assert (result.summary["new"] == 0).all() and (result.summary["failed"] == 0).all()
    assert result.summary["error"].str.contains(note, regex=False).all(), result.summary["error"].tolist()
    assert result.log.empty and not site.hits


# --------------------------------------------------------------------------------------------------------------
# Baidu and Flickr through icrawler's BaiduParser and FlickrParser


def test_baidu_parser_crawls_a_loopback_site(workspace: Workspace, tmp_path: Path) -> None:
    site = LoopbackSite(jpegs(tmp_path, 3), page=baidu_result_page)
    with site.serve() as endpoint:
        filters = {"type": "face", "color": "blackandwhite", "size": "large"}
        source = {"engine": "baidu", "endpoint": endpoint, "keywords": ["山田 太郎"], "filters": filters, "threads": 2}
        result = crawl_sources(workspace, loopback_sources(search=[source]))
        base = endpoint.split("/search")[0]
    assert site.queries == ["山田 太郎"]
    assert site.search_paths[0].endswith("&first=0&s=0&lm=0&st=-1&face=1&ic=2048&z=3"), site.search_paths
    assert set(result.log["url"]) == {f"{base}/img/{name}" for name in site.images}, "objURL and hoverURL items"
    assert set(result.log["source"]) == {"search:baidu"} and set(result.log["keyword"]) == {"山田 太郎"}
    assert result.summary[["new", "skipped", "failed"]].values.tolist() == [[3, 0, 0]]
    for row in result.log.itertuples():
        assert incoming(workspace, row.sha256, row.ext).read_bytes() == site.images[row.url.rsplit("/", 1)[1]]


def test_baidu_answer_that_is_not_json_is_an_empty_keyword(workspace: Workspace, tmp_path: Path) -> None:
    site = LoopbackSite(jpegs(tmp_path, 1), page=lambda urls: "<html>verify you are human</html>")
    with site.serve() as endpoint:
        source = {"engine": "baidu", "endpoint": endpoint, "keywords": ["x", "y"], "threads": 1}
        result = crawl_sources(workspace, loopback_sources(search=[source]))
    # BaiduParser logs the JSON error and yields nothing: each keyword ends as "no results", the crawl goes on.
    assert result.summary["keyword"].tolist() == ["x", "y"] and (result.summary["new"] == 0).all()
    assert (result.summary["error"] == "no results").all() and not site.hits


def test_flickr_parser_crawls_a_loopback_api(workspace: Workspace, tmp_path: Path) -> None:
    site = LoopbackSite(jpegs(tmp_path, 3))
    site.listing = {"cats": ["0.jpg", "2.jpg"]}
    with site.serve() as endpoint:
        api = endpoint.split("/search")[0] + "/services/rest/"
        source = {"engine": "flickr", "endpoint": api, "api_key": "k", "keywords": ["cats", "dogs"], "threads": 2}
        source["filters"] = {"license": "4", "sort": "relevance"}
        result = crawl_sources(workspace, loopback_sources(search=[source]))
        base = endpoint.split("/search")[0]
    assert set(result.log["url"]) == {f"{base}/img/0.jpg", f"{base}/img/2.jpg"}, "the Original size is fetched"
    rows = result.summary.set_index("keyword")
    assert rows.loc["cats", "new"] == 2 and rows.loc["dogs", "new"] == 0 and rows.loc["dogs", "error"] == "no results"
    search = [call for call in site.api_calls if call["method"] == "flickr.photos.search"]
    assert {call["text"] for call in search} == {"cats", "dogs"}
    assert all(call["api_key"] == "k" and call["license"] == "4" and call["sort"] == "relevance" for call in search)
    sizes = [call for call in site.api_calls if call["method"] == "flickr.photos.getSizes"]
    assert sorted(call["photo_id"] for call in sizes) == ["0.jpg", "2.jpg"]
    assert not site.hits["0.jpg?square"]


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ({"engine": "flickr", "api_key": "k", "keywords": ["x"], "endpoint": "http://h/?q={keyword}"}, "REST"),
        ({"engine": "flickr", "api_key": "k", "keywords": ["x"], "filters": {"type": "photo"}}, "parameter.*type"),
        ({"engine": "baidu", "keywords": ["x"], "endpoint": "http://h/?q={keyword}"}, r"search\[0\].endpoint"),
        ({"engine": "baidu", "keywords": ["x"], "filters": {"type": "photo"}}, r"search\[0\].filters"),
        (
            {"engine": "google", "keywords": ["x"], "fallback_engine": "bing", "fallback_endpoint": "http://h/"},
            r"search\[0\].fallback_endpoint must contain",
        ),
    ],
)
def test_bad_baidu_and_flickr_settings_are_named(workspace: Workspace, source: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        crawl_sources(workspace, loopback_sources(search=[source]))


def test_portable_filters_keep_what_the_other_engine_understands() -> None:
    reference = {"type": "photo", "color": "color", "size": ">4mp"}
    assert engines.portable_filters(reference, "bing") == ({"type": "photo", "color": "color"}, {"size": ">4mp"})
    assert engines.portable_filters(reference, "baidu") == ({}, reference)
    assert engines.portable_filters(reference, "flickr") == ({}, reference)
    assert engines.portable_filters({"size": ">2000x2000", "type": "photo"}, "google") == (
        {"type": "photo"},
        {"size": ">2000x2000"},
    )


def test_search_pages_pass_the_same_check(workspace: Workspace, tmp_path: Path) -> None:
    site = LoopbackSite({"0.jpg": jpeg(tmp_path, 0)})
    with site.serve() as endpoint:
        sources = loopback_sources(search=[bing(endpoint, ["x"])], allow_private_addresses=False)
        result = crawl_sources(workspace, sources)
    assert site.queries == [], "the loopback search page itself must not be requested"
    error = result.summary.set_index("keyword").loc["x", "error"]
    assert "search page refused" in error and "loopback" in error, error
