"""Crawl with real icrawler against loopback servers: search, URL lists, folders, incremental runs, failures."""

from __future__ import annotations

import contextlib
import io
import logging
import random
import socket
import threading
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import pandas as pd
import pytest

from pipeline_lib.acquire import crawl
from pipeline_lib.acquire.crawl import crawl_sources, detect_ext, read_crawl_log
from pipeline_lib.acquire.ingest import LOG_COLUMNS, ingest
from pipeline_lib.core.config import FolderSource, IngestConfig, SearchSource, SourcesConfig, UrlListSource
from pipeline_lib.core.config_loader import build_config
from pipeline_lib.core.workspace import Workspace, bytes_sha256, file_sha256
from pipeline_lib.ops.demo_data import (
    DemoDataset,
    demo_config_dict,
    generate_demo_dataset,
    result_page,
    search_site,
    serving,
)
from tests.conftest import make_image
from tests.loopback import LoopbackSite, baidu_result_page, changed_google_page, google_result_page

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> DemoDataset:
    return generate_demo_dataset(tmp_path_factory.mktemp("demo") / "data", n_persons_per_class=3, image_size=48)


def _sources(**kwargs: Any) -> SourcesConfig:
    """Loopback sources; recrawl_after_hours 0 (every crawl searches every keyword) unless a test says otherwise."""
    base = {"allow_private_addresses": True, "request_timeout_s": 3, "max_retries": 1, "recrawl_after_hours": 0}
    return SourcesConfig.model_validate(base | kwargs)


def _bing(endpoint: str, keywords: list[str], **kwargs: Any) -> dict[str, Any]:
    return {"engine": "bing", "endpoint": endpoint, "keywords": keywords, "max_num": 10, "threads": 2} | kwargs


def _served_urls(dataset: DemoDataset, endpoint: str, keywords: list[str]) -> set[str]:
    base = endpoint.split("/images/")[0]
    return {f"{base}/img/{k}/{p.name}" for k in keywords for p in (dataset.site_dir / k).iterdir()}


def _incoming(workspace: Workspace, sha: str, ext: str) -> Path:
    return workspace.incoming / sha[:2] / f"{sha}.{ext}"


# --------------------------------------------------------------------------------------------------------------
# A tiny Bing-like test server whose images can be made to fail


class TestSite:
    """Any keyword lists the same images; `fail` maps an image name to an HTTP status to answer instead."""

    __test__ = False

    def __init__(self, images: dict[str, bytes]) -> None:
        self.images = images
        self.fail: dict[str, int] = {}
        self.hits: Counter[str] = Counter()
        self.queries: list[str] = []

    @contextlib.contextmanager
    def serve(self) -> Iterator[str]:
        site = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                parts = urlsplit(self.path)
                port = self.server.server_address[1]
                if parts.path == "/search":
                    site.queries.append(parse_qs(parts.query)["q"][0])
                    names = list(site.images) if parse_qs(parts.query)["first"][0] == "0" else []
                    body = result_page([f"http://127.0.0.1:{port}/img/{quote(n)}" for n in names]).encode()
                    status = 200
                else:
                    name = parts.path.removeprefix("/img/")
                    site.hits[name] += 1
                    status = site.fail.get(name, 200 if name in site.images else 404)
                    body = site.images.get(name, b"") if status == 200 else b"error"
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        with serving(ThreadingHTTPServer(("127.0.0.1", 0), Handler)) as port:
            yield f"http://127.0.0.1:{port}/search?q={{keyword}}&first={{offset}}"


def _jpeg(tmp_path: Path, seed: int) -> bytes:
    return make_image(tmp_path / f"src-{seed}.jpg", seed=seed).read_bytes()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------------------------------------------
# Search


def test_first_crawl_fetches_everything_and_second_crawl_nothing(workspace: Workspace, dataset: DemoDataset) -> None:
    with search_site(dataset) as endpoint:
        config = build_config(demo_config_dict(dataset, endpoint, workspace.root))
        first = crawl_sources(workspace, config.sources, now=NOW)
        web = first.log[first.log["source"] == "search:bing"]
        assert set(web["url"]) == _served_urls(dataset, endpoint, dataset.keywords)
        assert (web["error"] == "").all() and (web["sha256"] != "").all()
        assert set(web["label"]) == {"real"} and set(web["generator"]) == {"camera"}
        assert (web["keyword"] == web["group"]).all()
        for row in first.log.itertuples():
            assert file_sha256(_incoming(workspace, row.sha256, row.ext)) == row.sha256
        assert (first.log["fetched_at"] == pd.Timestamp(NOW)).all()
        assert first.summary["new"].sum() > 0 and (first.summary["error"] == "").all()
        assert first.summary["new"].sum() + first.summary["skipped"].sum() == len(first.log)
        on_disk = read_crawl_log(workspace)
        pd.testing.assert_frame_equal(on_disk, first.log)
        assert str(on_disk["fetched_at"].dtype) == "datetime64[ns, UTC]" and str(on_disk["n_bytes"].dtype) == "int64"

        second = crawl_sources(workspace, config.sources)
        assert second.summary["new"].sum() == 0
        assert second.summary["skipped"].sum() == first.summary["new"].sum() + first.summary["skipped"].sum()
        assert len(second.log) == len(first.log)

    # the corrupt files arrived too, and ingest quarantines them
    catalog = ingest(workspace, second.log, IngestConfig(min_side=32))
    invalid = catalog[catalog["status"].str.startswith("invalid:")]
    assert len(invalid) == dataset.n_corrupt
    assert set(LOG_COLUMNS) <= set(second.log.columns)


def test_exact_duplicate_under_a_second_url_is_logged_and_skipped(workspace: Workspace, dataset: DemoDataset) -> None:
    with search_site(dataset) as endpoint:
        result = crawl_sources(workspace, _sources(search=[_bing(endpoint, ["person-01"])]))
    row = result.summary.iloc[0]
    assert (row["new"], row["skipped"], row["failed"]) == (len(result.log) - 1, 1, 0)
    assert result.log["sha256"].duplicated().sum() == 1
    assert len(list(workspace.incoming.rglob("*.*"))) == len(result.log) - 1


def test_keyword_without_results_is_a_summary_row(workspace: Workspace, dataset: DemoDataset) -> None:
    with search_site(dataset) as endpoint:
        result = crawl_sources(workspace, _sources(search=[_bing(endpoint, ["nobody-at-all", "person-02"])]))
    rows = result.summary.set_index("keyword")
    assert rows.loc["nobody-at-all", "new"] == 0 and rows.loc["nobody-at-all", "error"] == "no results"
    assert rows.loc["person-02", "new"] > 0 and rows.loc["person-02", "error"] == ""


def test_server_error_fails_one_row_and_is_retried_next_run(workspace: Workspace, tmp_path: Path) -> None:
    site = TestSite({f"{i}.jpg": _jpeg(tmp_path, i) for i in range(3)} | {"gone.jpg": b"x"})
    site.fail = {"1.jpg": 500, "gone.jpg": 404}
    with site.serve() as endpoint:
        sources = _sources(search=[_bing(endpoint, ["someone"])], max_retries=2)
        first = crawl_sources(workspace, sources)
        errors = dict(zip(first.log["url"].str.rsplit("/", n=1).str[1], first.log["error"], strict=True))
        assert errors == {"0.jpg": "", "1.jpg": "http 500", "2.jpg": "", "gone.jpg": "http 404"}
        assert site.hits["1.jpg"] == 3 and site.hits["gone.jpg"] == 1  # 5xx retried, other 4xx not
        assert first.summary.iloc[0][["new", "skipped", "failed"]].tolist() == [2, 0, 2]

        site.fail = {"gone.jpg": 404}
        second = crawl_sources(workspace, sources)
    assert second.summary.iloc[0][["new", "skipped", "failed"]].tolist() == [1, 2, 1]
    assert len(second.log) == len(first.log) + 2  # the retried 1.jpg and gone.jpg again
    fetched = second.log[second.log["url"].str.endswith("/1.jpg") & (second.log["sha256"] != "")]
    assert len(fetched) == 1


def test_private_addresses_are_refused_without_the_flag(workspace: Workspace, tmp_path: Path) -> None:
    site = TestSite({"0.jpg": _jpeg(tmp_path, 0)})
    with site.serve() as endpoint:
        result = crawl_sources(workspace, _sources(search=[_bing(endpoint, ["x"])], allow_private_addresses=False))
    assert result.log["error"].str.contains("loopback").all()
    assert site.hits["0.jpg"] == 0
    assert not list(workspace.incoming.rglob("*.jpg"))


def test_japanese_keyword_from_a_keywords_file_round_trips(workspace: Workspace, tmp_path: Path) -> None:
    keywords = tmp_path / "names.txt"
    keywords.write_text("# people\n山田太郎\n\n  \n", encoding="utf-8")
    site = TestSite({"0.jpg": _jpeg(tmp_path, 0)})
    with site.serve() as endpoint:
        crawl_sources(workspace, _sources(search=[_bing(endpoint, [], keywords_file=keywords)]))
    assert site.queries == ["山田太郎"]
    stored = read_crawl_log(workspace)
    assert stored["keyword"].tolist() == ["山田太郎"] and stored["group"].tolist() == ["山田太郎"]


def test_keywords_from_csv_and_inline_are_merged(tmp_path: Path) -> None:
    path = tmp_path / "names.csv"
    path.write_text("keyword,notes\n山田 花子,x\nNaomi Osaka,y\n,z\n", encoding="utf-8")
    source = SearchSource(keywords=["Naomi Osaka", "A"], keywords_file=path)
    assert crawl.source_keywords(source, 0) == ["Naomi Osaka", "A", "山田 花子"]
    (tmp_path / "bad.csv").write_text("name\nx\n", encoding="utf-8")
    with pytest.raises(ValueError, match="bad.csv has no 'keyword' column"):
        crawl.read_keywords(tmp_path / "bad.csv")


def test_network_loss_keeps_what_was_fetched(workspace: Workspace, dataset: DemoDataset) -> None:
    dead = f"http://127.0.0.1:{_closed_port()}/images/async?q={{keyword}}&first={{offset}}"
    with search_site(dataset) as endpoint:
        broken = _sources(search=[_bing(endpoint, ["person-01"]), _bing(dead, ["person-02"])])
        first = crawl_sources(workspace, broken)
        rows = first.summary.set_index("keyword")
        assert rows.loc["person-01", "new"] > 0
        assert rows.loc["person-02", "new"] == 0 and "search page failed" in rows.loc["person-02", "error"]
        kept = read_crawl_log(workspace)
        assert set(kept["url"]) == _served_urls(dataset, endpoint, ["person-01"])

        healthy = _sources(search=[_bing(endpoint, ["person-01", "person-02"])])
        second = crawl_sources(workspace, healthy)
    rows = second.summary.set_index("keyword")
    assert rows.loc["person-01", "new"] == 0 and rows.loc["person-01", "skipped"] == len(kept)
    assert rows.loc["person-02", "new"] > 0
    assert set(second.log["url"]) == _served_urls(dataset, endpoint, ["person-01", "person-02"])


def test_a_keyword_is_searched_again_only_after_recrawl_after_hours(workspace: Workspace, tmp_path: Path) -> None:
    site = TestSite({"0.jpg": _jpeg(tmp_path, 0)})
    keywords = tmp_path / "names.txt"
    keywords.write_text("alice\n", encoding="utf-8")
    sources = _sources(search=[_bing("", [], keywords_file=keywords)], recrawl_after_hours=20)
    with site.serve() as endpoint:
        sources = sources.model_copy(update={"search": [sources.search[0].model_copy(update={"endpoint": endpoint})]})
        crawl_sources(workspace, sources, now=NOW)
        searched = pd.read_parquet(crawl.searches_path(workspace))
        assert searched[["source", "keyword"]].values.tolist() == [["search:bing", "alice"]]

        # 19 h later, a name added to the file: only the new name is searched, the log file is not rewritten
        keywords.write_text("alice\nbob\n", encoding="utf-8")
        log_stamp = crawl.crawl_log_path(workspace).stat().st_mtime_ns
        later = crawl_sources(workspace, sources, now=NOW + pd.Timedelta(hours=19))
        assert site.queries == ["alice", "bob"], site.queries
        assert later.not_due == [("search:bing", "alice")]
        assert crawl.crawl_log_path(workspace).stat().st_mtime_ns == log_stamp, "nothing new: the log is not rewritten"

        # 21 h after the first search (a daily schedule with slack): alice is due again, bob not yet
        next_day = crawl_sources(workspace, sources, now=NOW + pd.Timedelta(hours=21))
    assert site.queries == ["alice", "bob", "alice"], site.queries
    assert next_day.not_due == [("search:bing", "bob")]
    stamps = pd.read_parquet(crawl.searches_path(workspace)).set_index("keyword")["searched_at"]
    assert stamps["alice"] == pd.Timestamp(NOW + pd.Timedelta(hours=21)), stamps
    assert stamps["bob"] == pd.Timestamp(NOW + pd.Timedelta(hours=19)), stamps


def test_a_failed_search_is_not_stamped_and_is_tried_again(workspace: Workspace, dataset: DemoDataset) -> None:
    dead = f"http://127.0.0.1:{_closed_port()}/images/async?q={{keyword}}&first={{offset}}"
    sources = _sources(search=[_bing(dead, ["person-01"])], recrawl_after_hours=20)
    first = crawl_sources(workspace, sources, now=NOW)
    assert "search page failed" in first.summary.iloc[0]["error"]
    assert not crawl.searches_path(workspace).exists(), "a search that failed must not wait recrawl_after_hours"
    with search_site(dataset) as endpoint:
        healthy = _sources(search=[_bing(endpoint, ["person-01"])], recrawl_after_hours=20)
        second = crawl_sources(workspace, healthy, now=NOW + pd.Timedelta(minutes=5))
    assert second.not_due == [] and second.summary.iloc[0]["new"] > 0


def test_due_keywords_boundaries() -> None:
    searches = pd.DataFrame(
        {"source": ["search:bing", "search:google"], "keyword": ["a", "b"], "searched_at": [pd.Timestamp(NOW)] * 2}
    ).astype(crawl.SEARCH_COLUMNS)
    at = NOW + pd.Timedelta(hours=20)
    assert crawl.due_keywords(searches, "search:bing", ["a", "b"], at, 20) == (["a", "b"], [])
    assert crawl.due_keywords(searches, "search:bing", ["a", "b"], at, 20.5) == (["b"], ["a"])
    assert crawl.due_keywords(searches, "search:google", ["a", "b"], at, 21) == (["a"], ["b"])
    assert crawl.due_keywords(searches, "search:bing", ["a"], NOW, 0) == (["a"], []), "0 h: every crawl searches"


def test_log_is_persisted_when_a_source_raises(
    workspace: Workspace, dataset: DemoDataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    def explode(*args: Any) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(crawl, "_crawl_folder", explode)
    with search_site(dataset) as endpoint:
        sources = _sources(search=[_bing(endpoint, ["person-03"])], folders=[{"path": dataset.ai_dir, "label": "ai"}])
        with pytest.raises(RuntimeError, match="disk on fire"):
            crawl_sources(workspace, sources)
        assert set(read_crawl_log(workspace)["url"]) == _served_urls(dataset, endpoint, ["person-03"])


def test_max_num_limits_each_keyword(workspace: Workspace, tmp_path: Path) -> None:
    site = TestSite({f"{i}.jpg": _jpeg(tmp_path, i) for i in range(6)})
    with site.serve() as endpoint:
        result = crawl_sources(workspace, _sources(search=[_bing(endpoint, ["a", "b"], max_num=2, threads=3)]))
    assert result.summary["new"].tolist() == [2, 0] and result.summary["skipped"].tolist() == [0, 2]


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
        crawl_sources(workspace, _sources(search=[source]))


def test_missing_keywords_file_is_named(workspace: Workspace, tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        crawl_sources(workspace, _sources(search=[{"keywords_file": missing}]))


def test_many_threads_write_every_file_exactly_once_whole_over_one_connection_each(
    workspace: Workspace, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    distinct = {f"{i}.jpg": _jpeg(tmp_path, i) for i in range(96)}
    copies = {f"copy{i}.jpg": distinct[f"{i}.jpg"] for i in range(96)}  # the same bytes under a second URL
    site = LoopbackSite(distinct | copies)
    threads = 32
    with site.serve() as endpoint:
        base = endpoint.split("/search")[0]
        listing = tmp_path / "list.csv"
        listing.write_text("url,label,group\n" + "".join(f"{base}/img/{n},real,g\n" for n in site.images))
        with caplog.at_level(logging.WARNING, logger="urllib3"):
            result = crawl_sources(workspace, _sources(urls=[UrlListSource(csv=listing, threads=threads)]))
    by_sha = {bytes_sha256(data): data for data in distinct.values()}
    files = [path for path in workspace.incoming.rglob("*") if path.is_file()]
    assert sorted(path.stem for path in files) == sorted(by_sha), "every distinct file exactly once"
    for path in files:
        assert path.read_bytes() == by_sha[path.stem] and path.parent.name == path.stem[:2]
    _no_half_written_files(workspace)
    assert result.summary[["new", "skipped", "failed"]].sum().tolist() == [96, 96, 0]
    names = result.log["url"].str.rsplit("/", n=1).str[1]
    assert sorted(names) == sorted(site.images)
    assert [bytes_sha256(site.images[name]) for name in names] == result.log["sha256"].tolist()
    assert len(site.connections) <= threads + 1, "the connection pool keeps one connection per thread"
    assert not [r for r in caplog.records if "pool is full" in r.getMessage()], "no connection was discarded"


def test_concurrent_stores_of_the_same_bytes_write_each_file_once(workspace: Workspace) -> None:
    payloads = [bytes([i]) * (50_000 + i) for i in range(16)]
    state = crawl.CrawlState(workspace, crawl.empty_log(), NOW)
    start = threading.Barrier(48)
    outcomes: list[tuple[str, str, bool]] = []
    lock = threading.Lock()

    def store_all(seed: int) -> None:
        order = random.Random(seed).sample(payloads, len(payloads))
        start.wait()
        for data in order:
            outcome = state.store(data, "http://h/x.jpg")
            with lock:
                outcomes.append(outcome)

    workers = [threading.Thread(target=store_all, args=(seed,)) for seed in range(48)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    new = Counter(sha for sha, _, is_new in outcomes if is_new)
    assert sorted(new) == sorted(bytes_sha256(data) for data in payloads) and set(new.values()) == {1}
    assert len(outcomes) == 48 * 16 and {ext for _, ext, _ in outcomes} == {"jpg"}
    files = sorted(path for path in workspace.incoming.rglob("*") if path.is_file())
    assert [path.read_bytes() for path in files] == sorted(payloads, key=bytes_sha256)
    state.sync()  # durable before the log names them; a second crawl state finds them all held
    held = crawl.held_files(workspace)
    assert all(held[bytes_sha256(data)].read_bytes() == data for data in payloads)


# --------------------------------------------------------------------------------------------------------------
# URL lists


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
        result = crawl_sources(workspace, _sources(urls=[UrlListSource(csv=listing)]))
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
        crawl_sources(workspace, _sources(urls=[UrlListSource(csv=listing)]))
    assert not crawl.crawl_log_path(workspace).exists()


# --------------------------------------------------------------------------------------------------------------
# Folders


def _folder(root: Path) -> Path:
    make_image(root / "alice" / "alice_1.jpg", seed=1)
    make_image(root / "alice" / "deeper" / "alice_2.png", seed=2, fmt="PNG")
    make_image(root / "bob_7.jpg", seed=3)
    make_image(root / "noname.jpg", seed=4)
    make_image(root / ".hidden.jpg", seed=5)
    make_image(root / ".cache" / "x_1.jpg", seed=6)
    (root / ".gitkeep").write_text("", encoding="utf-8")
    (root / "notes.txt").write_text("not an image", encoding="utf-8")
    make_image(root / "no_extension", seed=7)  # a JPEG whose name says nothing
    return root


def _groups(result: crawl.CrawlResult) -> dict[str, tuple[str, str]]:
    return {Path(url).name: (group, error) for url, group, error in result.log[["url", "group", "error"]].values}


def test_folder_grouped_by_sub_folder(workspace: Workspace, tmp_path: Path) -> None:
    root = _folder(tmp_path / "imgs")
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    source = FolderSource(path=root, label="ai", group_by="folder", generator="midjourney")
    result = crawl_sources(workspace, _sources(folders=[source]), now=NOW)
    assert _groups(result) == {
        "alice_1.jpg": ("alice", ""),
        "alice_2.png": ("alice", ""),
        "bob_7.jpg": ("bob_7", ""),
        "noname.jpg": ("noname", ""),
        "no_extension": ("no_extension", ""),
        "notes.txt": ("", "not an image (text)"),
    }
    assert set(result.log["source"]) == {"folder:imgs"} and set(result.log["generator"]) == {"midjourney"}
    assert result.log["url"].str.startswith("file://").all()
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before  # copied, never moved
    for row in result.log[result.log["sha256"] != ""].itertuples():
        assert (
            _incoming(workspace, row.sha256, row.ext).read_bytes()
            == Path(root / row.url.split("imgs/")[1]).read_bytes()
        )
    again = crawl_sources(workspace, _sources(folders=[source]))
    assert len(again.log) == len(result.log) and again.summary["skipped"].sum() == 5  # notes.txt is logged once
    (root / "bob_7.jpg").write_bytes(_jpeg(tmp_path, 9))  # changed content under the same URL
    third = crawl_sources(workspace, _sources(folders=[source]))
    assert len(third.log) == len(result.log) + 1 and third.summary["new"].sum() == 1


def test_folder_grouped_by_pattern(workspace: Workspace, tmp_path: Path) -> None:
    root = _folder(tmp_path / "imgs")
    source = FolderSource(path=root, label="ai", group_by=r"pattern:^([a-z]+)_\d+")
    result = crawl_sources(workspace, _sources(folders=[source]))
    groups = _groups(result)
    assert groups["alice_1.jpg"] == ("alice", "") and groups["bob_7.jpg"] == ("bob", "")
    assert groups["noname.jpg"] == groups["no_extension"] == ("", "group pattern did not match")
    assert result.summary["failed"].sum() == 2
    whole = crawl_sources(workspace, _sources(folders=[FolderSource(path=root, label="ai", group_by="pattern:[a-z]+")]))
    assert _groups(whole)["noname.jpg"] == ("noname", "")


def test_folder_grouped_by_csv(workspace: Workspace, tmp_path: Path) -> None:
    root = _folder(tmp_path / "imgs")
    (root / "groups.csv").write_text(
        "file,group\nalice/alice_1.jpg,p1\nalice/deeper/alice_2.png,p1\nbob_7.jpg,p2\n", encoding="utf-8"
    )
    result = crawl_sources(
        workspace, _sources(folders=[FolderSource(path=root, label="ai", group_by="csv:groups.csv")])
    )
    groups = _groups(result)
    assert groups["alice_2.png"] == ("p1", "") and groups["bob_7.jpg"] == ("p2", "")
    assert groups["noname.jpg"] == ("", "no group in groups.csv")
    with pytest.raises(FileNotFoundError, match="other.csv"):
        crawl_sources(workspace, _sources(folders=[FolderSource(path=root, label="ai", group_by="csv:other.csv")]))


def test_group_csv_generator_column_names_each_files_generator(workspace: Workspace, tmp_path: Path) -> None:
    root = _folder(tmp_path / "imgs")
    (root / "groups.csv").write_text(
        "file,group,generator\n"
        "alice/alice_1.jpg,p1,midjourney\n"
        "alice/deeper/alice_2.png,p1,stable-diffusion\n"
        "bob_7.jpg,p2,\n"
        "noname.jpg,p3, DALL·E 3 \n",
        encoding="utf-8",
    )
    source = FolderSource(path=root, label="ai", group_by="csv:groups.csv", generator="unknown-tool")
    result = crawl_sources(workspace, _sources(folders=[source]))
    generators = dict(zip(result.log["url"].map(lambda u: Path(u).name), result.log["generator"], strict=True))
    assert generators == {
        "alice_1.jpg": "midjourney",
        "alice_2.png": "stable-diffusion",
        "bob_7.jpg": "unknown-tool",  # empty cell: the folder's generator
        "noname.jpg": "DALL·E 3",
        "no_extension": "unknown-tool",  # an image by its bytes, not in the CSV
        "groups.csv": "unknown-tool",  # left out (not images): logged with the folder's generator
        "notes.txt": "unknown-tool",
    }
    assert crawl.read_group_csv(root / "groups.csv", root)["bob_7.jpg"] == "p2"


def test_file_already_in_the_store_is_logged_but_not_copied(workspace: Workspace, tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    data = make_image(root / "p" / "a.jpg", seed=3).read_bytes()
    result = crawl_sources(workspace, _sources(folders=[FolderSource(path=root, label="real")]))
    sha = result.log["sha256"].iloc[0]
    stored = workspace.store_path(sha, "jpg")
    stored.parent.mkdir(parents=True)
    _incoming(workspace, sha, "jpg").rename(stored)
    (root / "p" / "b.jpg").write_bytes(data)
    second = crawl_sources(workspace, _sources(folders=[FolderSource(path=root, label="real")]))
    assert second.summary[["new", "skipped"]].sum().tolist() == [0, 2]
    assert len(second.log) == 2 and not list(workspace.incoming.rglob("*.jpg"))


# --------------------------------------------------------------------------------------------------------------
# Google through icrawler's GoogleParser


def _google(endpoint: str, keywords: list[str], **kwargs: Any) -> dict[str, Any]:
    template = endpoint.replace("first=", "start=")
    return {"engine": "google", "endpoint": template, "keywords": keywords, "max_num": 10, "threads": 2} | kwargs


def _images(tmp_path: Path, n: int) -> dict[str, bytes]:
    return {f"{i}.jpg": _jpeg(tmp_path, i) for i in range(n)}


def test_google_parser_crawls_a_loopback_site(workspace: Workspace, tmp_path: Path) -> None:
    site = LoopbackSite(_images(tmp_path, 3), page=google_result_page)
    with site.serve() as endpoint:
        filters = {"type": "photo", "color": "color", "size": ">4mp"}
        result = crawl_sources(workspace, _sources(search=[_google(endpoint, ["山田 太郎"], filters=filters)]))
        base = endpoint.split("/search")[0]
    assert site.queries == ["山田 太郎"]
    assert site.search_paths[0].endswith("&start=0&tbs=itp:photo,ic:color,isz:lt,islt:4mp")
    assert set(result.log["url"]) == {f"{base}/img/{name}" for name in site.images}
    assert set(result.log["source"]) == {"search:google"} and set(result.log["keyword"]) == {"山田 太郎"}
    assert result.summary[["new", "skipped", "failed"]].values.tolist() == [[3, 0, 0]]
    assert result.summary["error"].tolist() == [""]
    for row in result.log.itertuples():
        assert _incoming(workspace, row.sha256, row.ext).read_bytes() == site.images[row.url.rsplit("/", 1)[1]]
    assert sum(site.hits.values()) == 3, "thumbnails (no image suffix) must not be fetched"


def test_google_feeder_keeps_the_real_site_and_its_filters() -> None:
    feeder = crawl.EndpointGoogleFeeder(1, None, None)
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
    site = LoopbackSite(_images(tmp_path, 2), page=page)
    with site.serve() as endpoint:
        result = crawl_sources(workspace, _sources(search=[_google(endpoint, ["x", "y"])]))
    assert result.summary["keyword"].tolist() == ["x", "y"]
    assert (result.summary["new"] == 0).all() and (result.summary["failed"] == 0).all()
    assert result.summary["error"].str.contains(note, regex=False).all(), result.summary["error"].tolist()
    assert result.log.empty and not site.hits


# --------------------------------------------------------------------------------------------------------------
# Baidu and Flickr through icrawler's BaiduParser and FlickrParser


def test_baidu_parser_crawls_a_loopback_site(workspace: Workspace, tmp_path: Path) -> None:
    site = LoopbackSite(_images(tmp_path, 3), page=baidu_result_page)
    with site.serve() as endpoint:
        filters = {"type": "face", "color": "blackandwhite", "size": "large"}
        source = {"engine": "baidu", "endpoint": endpoint, "keywords": ["山田 太郎"], "filters": filters, "threads": 2}
        result = crawl_sources(workspace, _sources(search=[source]))
        base = endpoint.split("/search")[0]
    assert site.queries == ["山田 太郎"]
    assert site.search_paths[0].endswith("&first=0&s=0&lm=0&st=-1&face=1&ic=2048&z=3"), site.search_paths
    assert set(result.log["url"]) == {f"{base}/img/{name}" for name in site.images}, "objURL and hoverURL items"
    assert set(result.log["source"]) == {"search:baidu"} and set(result.log["keyword"]) == {"山田 太郎"}
    assert result.summary[["new", "skipped", "failed"]].values.tolist() == [[3, 0, 0]]
    for row in result.log.itertuples():
        assert _incoming(workspace, row.sha256, row.ext).read_bytes() == site.images[row.url.rsplit("/", 1)[1]]


def test_baidu_answer_that_is_not_json_is_an_empty_keyword(workspace: Workspace, tmp_path: Path) -> None:
    site = LoopbackSite(_images(tmp_path, 1), page=lambda urls: "<html>verify you are human</html>")
    with site.serve() as endpoint:
        source = {"engine": "baidu", "endpoint": endpoint, "keywords": ["x", "y"], "threads": 1}
        result = crawl_sources(workspace, _sources(search=[source]))
    # BaiduParser logs the JSON error and yields nothing: each keyword ends as "no results", the crawl goes on.
    assert result.summary["keyword"].tolist() == ["x", "y"] and (result.summary["new"] == 0).all()
    assert (result.summary["error"] == "no results").all() and not site.hits


def test_flickr_parser_crawls_a_loopback_api(workspace: Workspace, tmp_path: Path) -> None:
    site = LoopbackSite(_images(tmp_path, 3))
    site.listing = {"cats": ["0.jpg", "2.jpg"]}
    with site.serve() as endpoint:
        api = endpoint.split("/search")[0] + "/services/rest/"
        source = {"engine": "flickr", "endpoint": api, "api_key": "k", "keywords": ["cats", "dogs"], "threads": 2}
        source["filters"] = {"license": "4", "sort": "relevance"}
        result = crawl_sources(workspace, _sources(search=[source]))
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
        crawl_sources(workspace, _sources(search=[source]))


def test_portable_filters_keep_what_the_other_engine_understands() -> None:
    reference = {"type": "photo", "color": "color", "size": ">4mp"}
    assert crawl.portable_filters(reference, "bing") == ({"type": "photo", "color": "color"}, {"size": ">4mp"})
    assert crawl.portable_filters(reference, "baidu") == ({}, reference)
    assert crawl.portable_filters(reference, "flickr") == ({}, reference)
    assert crawl.portable_filters({"size": ">2000x2000", "type": "photo"}, "google") == (
        {"type": "photo"},
        {"size": ">2000x2000"},
    )


# --------------------------------------------------------------------------------------------------------------
# A flaky endpoint: 500s, timeouts, truncated bodies


def _no_half_written_files(workspace: Workspace) -> None:
    for folder in (workspace.incoming, workspace.store, workspace.quarantine):
        for path in folder.rglob("*"):
            assert not path.name.startswith(".") and not path.name.endswith(".part"), f"temporary file {path}"
            if path.is_file():
                assert file_sha256(path) == path.stem, f"{path} does not hold the bytes its name says"
                assert path.parent.name == path.stem[:2] or folder == workspace.quarantine


def test_flaky_endpoint_retries_logs_specific_errors_and_never_half_writes(
    workspace: Workspace, tmp_path: Path
) -> None:
    names = ["good", "flaky500", "dead500", "slow", "cut_once", "cut_always"]
    site = LoopbackSite({f"{name}.jpg": _jpeg(tmp_path, i) for i, name in enumerate(names)})
    site.fail_first = {"flaky500.jpg": 2, "dead500.jpg": 99}
    site.slow = {"slow.jpg": 1.0}
    site.truncate_first = {"cut_once.jpg": 1, "cut_always.jpg": 99}
    with site.serve() as endpoint:
        sources = _sources(search=[_bing(endpoint, ["k"], threads=3)], request_timeout_s=0.3, max_retries=2)
        first = crawl_sources(workspace, sources)
        stored_log = read_crawl_log(workspace)
        errors = dict(zip(stored_log["url"].str.rsplit("/", n=1).str[1], stored_log["error"], strict=True))
        assert site.hits == {
            "good.jpg": 1,
            "flaky500.jpg": 3,
            "dead500.jpg": 3,
            "slow.jpg": 3,
            "cut_once.jpg": 2,
            "cut_always.jpg": 3,
        }, "server-side request counts show the retries"
        assert {k: v for k, v in errors.items() if v == ""}.keys() == {"good.jpg", "flaky500.jpg", "cut_once.jpg"}
        assert errors["dead500.jpg"] == "http 500"
        assert errors["slow.jpg"].startswith("ReadTimeout:") and "read timeout=0.3" in errors["slow.jpg"]
        size = len(site.images["cut_always.jpg"])
        assert errors["cut_always.jpg"] == f"truncated body: got {size // 2} of {size} bytes"
        assert first.summary[["new", "skipped", "failed"]].values.tolist() == [[3, 0, 3]]
        for row in stored_log[stored_log["sha256"] != ""].itertuples():
            assert _incoming(workspace, row.sha256, row.ext).read_bytes() == site.images[row.url.rsplit("/", 1)[1]]
        assert len([p for p in workspace.incoming.rglob("*") if p.is_file()]) == 3
        _no_half_written_files(workspace)

        catalog = ingest(workspace, first.log, IngestConfig(min_side=16))
        assert (catalog["status"] == "ok").all() and len(catalog) == 3
        _no_half_written_files(workspace)

        site.fail_first, site.slow, site.truncate_first = {}, {}, {}
        second = crawl_sources(workspace, sources)
    assert second.summary[["new", "skipped", "failed"]].values.tolist() == [[3, 3, 0]]
    _no_half_written_files(workspace)


def test_body_shorter_than_content_length_is_never_returned(tmp_path: Path) -> None:
    site = LoopbackSite({"a.jpg": _jpeg(tmp_path, 1)})
    site.truncate_first = {"a.jpg": 1}
    with site.serve() as endpoint, crawl.requests.Session() as session:
        url = endpoint.split("/search")[0] + "/img/a.jpg"
        once = _sources(max_retries=0)
        assert crawl.fetch_bytes(session, url, once) == (
            None,
            f"truncated body: got {len(site.images['a.jpg']) // 2} of {len(site.images['a.jpg'])} bytes",
        )
        assert crawl.fetch_bytes(session, url, once) == (site.images["a.jpg"], "")


def test_detect_ext_prefers_the_bytes(tmp_path: Path) -> None:
    png = io.BytesIO()
    make_image(tmp_path / "a.png", fmt="PNG")
    png.write((tmp_path / "a.png").read_bytes())
    assert detect_ext(png.getvalue(), "http://h/photo.jpg") == "png"
    assert detect_ext(_jpeg(tmp_path, 1), "http://h/no-suffix") == "jpg"
    assert detect_ext(b"<html></html>", "http://h/x.JPEG?size=2") == "jpg"
    assert detect_ext(b"<html></html>", "http://h/page") == "bin"


# --------------------------------------------------------------------------------------------------------------
# A total deadline per download, and a declared length over the cap refused before reading


@contextlib.contextmanager
def _raw_site(answer: Any) -> Iterator[str]:
    """A loopback server whose every GET is answered by answer(handler); yields its base URL; counts requests."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            answer.hits += 1
            try:
                answer(self)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up
                self.close_connection = True

    answer.hits = 0
    with serving(ThreadingHTTPServer(("127.0.0.1", 0), Handler)) as port:
        yield f"http://127.0.0.1:{port}"


def test_a_server_trickling_bytes_hits_the_total_deadline(tmp_path: Path) -> None:
    import time

    body = b"x" * 40

    def trickle(handler: BaseHTTPRequestHandler) -> None:  # one byte every 0.25 s: no read ever times out
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        for byte in body:
            handler.wfile.write(bytes([byte]))
            handler.wfile.flush()
            time.sleep(0.25)

    with _raw_site(trickle) as base, crawl.requests.Session() as session:
        sources = _sources(request_timeout_s=3, download_timeout_s=1.5, max_retries=2)
        data, error = crawl.fetch_bytes(session, f"{base}/slow.jpg", sources)
    assert data is None, "a download must not outlive its deadline however steadily the bytes trickle"
    assert "took longer than 1.5 s in all" in error, error
    assert trickle.hits == 1, "a download that ran out of time is not retried"


def test_a_declared_length_over_the_cap_is_refused_before_reading(tmp_path: Path) -> None:
    def huge(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", str(crawl.MAX_DOWNLOAD_BYTES + 1))
        handler.end_headers()
        handler.wfile.write(b"\xff\xd8\xff" + b"\0" * 1000)
        handler.wfile.flush()
        handler.close_connection = True

    with _raw_site(huge) as base, crawl.requests.Session() as session:
        data, error = crawl.fetch_bytes(session, f"{base}/huge.jpg", _sources(max_retries=2))
    assert data is None and f"declared Content-Length {crawl.MAX_DOWNLOAD_BYTES + 1}" in error, error
    assert huge.hits == 1, "refused at once, not read, not retried"


def test_search_pages_pass_the_same_check(workspace: Workspace, tmp_path: Path) -> None:
    site = TestSite({"0.jpg": _jpeg(tmp_path, 0)})
    with site.serve() as endpoint:
        result = crawl_sources(workspace, _sources(search=[_bing(endpoint, ["x"])], allow_private_addresses=False))
    assert site.queries == [], "the loopback search page itself must not be requested"
    error = result.summary.set_index("keyword").loc["x", "error"]
    assert "search page refused" in error and "loopback" in error, error


def test_over_long_keywords_are_refused_with_where_they_came_from(workspace: Workspace, tmp_path: Path) -> None:
    long, endpoint = "x" * 220, "http://127.0.0.1:9/s?q={keyword}&first={offset}"
    with pytest.raises(ValueError, match=r"sources.search\[0\].keywords: keyword 'x+'\.\.\. is 220 characters"):
        crawl_sources(workspace, _sources(search=[_bing(endpoint, [long])]))
    keywords = tmp_path / "names.txt"
    keywords.write_text(f"fine\n{long}\n", encoding="utf-8")
    source = _bing(endpoint, [], keywords_file=keywords)
    with pytest.raises(ValueError, match="names.txt: keyword .* the limit is 100"):
        crawl_sources(workspace, _sources(search=[source]))
    urls = tmp_path / "urls.csv"
    urls.write_text(f"url,label,group\nhttp://127.0.0.1:9/a.jpg,real,{long}\n", encoding="utf-8")
    with pytest.raises(ValueError, match="urls.csv, line 2: keyword"):
        crawl.read_url_list(urls)
    empty = tmp_path / "empty.txt"
    empty.write_text("# nobody yet\n", encoding="utf-8")
    with pytest.raises(ValueError, match="has no keywords .*empty.txt holds none"):
        crawl_sources(workspace, _sources(search=[_bing(endpoint, [], keywords_file=empty)]))
