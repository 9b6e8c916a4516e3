"""HTTP downloads against loopback servers: retries seen from the server's side, specific errors, no half-written
files, a total deadline, a size cap, private addresses refused.

No test depends on how fast the machine is: a timeout that must fire meets a server that holds its answer back
until the test ends, and every other request has a timeout far longer than any loopback answer takes.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from pipeline_lib.acquire import fetch
from pipeline_lib.acquire.crawl import crawl_sources
from pipeline_lib.acquire.crawl_log import read_crawl_log
from pipeline_lib.acquire.ingest import ingest
from pipeline_lib.core.config import IngestConfig, UrlListSource
from pipeline_lib.core.workspace import Workspace
from pipeline_lib.ops.demo_data import serving
from tests.acquire.crawl_helpers import bing, incoming, jpeg, jpegs, loopback_sources, no_half_written_files
from tests.loopback import LoopbackSite, closed_port_url


def _url_list(tmp_path: Path, urls: list[str]) -> UrlListSource:
    listing = tmp_path / "list.csv"
    listing.write_text("url,label,group\n" + "".join(f"{url},real,g\n" for url in urls), encoding="utf-8")
    return UrlListSource(csv=listing)


def _names_and_errors(log: Any) -> dict[str, str]:
    return dict(zip(log["url"].str.rsplit("/", n=1).str[1], log["error"], strict=True))


def test_server_error_fails_one_row_and_is_retried_next_run(workspace: Workspace, tmp_path: Path) -> None:
    site = LoopbackSite(jpegs(tmp_path, 3))
    site.listing = {"someone": ["0.jpg", "1.jpg", "2.jpg", "gone.jpg"]}  # gone.jpg: 404
    site.fail_first = {"1.jpg": 99}
    with site.serve() as endpoint:
        sources = loopback_sources(search=[bing(endpoint, ["someone"])], max_retries=2)
        first = crawl_sources(workspace, sources)
        errors = _names_and_errors(first.log)
        assert errors == {"0.jpg": "", "1.jpg": "http 500", "2.jpg": "", "gone.jpg": "http 404"}
        assert site.hits["1.jpg"] == 3 and site.hits["gone.jpg"] == 1  # 5xx retried, other 4xx not
        assert first.summary.iloc[0][["new", "skipped", "failed"]].tolist() == [2, 0, 2]

        site.fail_first = {}
        second = crawl_sources(workspace, sources)
    assert second.summary.iloc[0][["new", "skipped", "failed"]].tolist() == [1, 2, 1]
    assert len(second.log) == len(first.log) + 2  # the retried 1.jpg and gone.jpg again
    fetched = second.log[second.log["url"].str.endswith("/1.jpg") & (second.log["sha256"] != "")]
    assert len(fetched) == 1


def test_private_addresses_are_refused_without_the_flag(workspace: Workspace, tmp_path: Path) -> None:
    site = LoopbackSite({"0.jpg": jpeg(tmp_path, 0)})
    with site.serve() as endpoint:
        urls = _url_list(tmp_path, [endpoint.split("/search")[0] + "/img/0.jpg"])
        result = crawl_sources(workspace, loopback_sources(urls=[urls], allow_private_addresses=False))
    assert len(result.log) == 1 and result.log["error"].str.contains("loopback").all(), result.log["error"]
    assert site.hits["0.jpg"] == 0
    assert not list(workspace.incoming.rglob("*.jpg"))


def test_flaky_endpoint_retries_logs_specific_errors_and_never_half_writes(
    workspace: Workspace, tmp_path: Path
) -> None:
    names = ["good", "flaky500", "dead500", "cut_once", "cut_always"]
    site = LoopbackSite({f"{name}.jpg": jpeg(tmp_path, i) for i, name in enumerate(names)})
    site.fail_first = {"flaky500.jpg": 2, "dead500.jpg": 99}
    site.truncate_first = {"cut_once.jpg": 1, "cut_always.jpg": 99}
    with site.serve() as endpoint:
        sources = loopback_sources(search=[bing(endpoint, ["k"], threads=3)], max_retries=2)
        first = crawl_sources(workspace, sources)
        stored_log = read_crawl_log(workspace)
        errors = _names_and_errors(stored_log)
        assert site.hits == {
            "good.jpg": 1,
            "flaky500.jpg": 3,
            "dead500.jpg": 3,
            "cut_once.jpg": 2,
            "cut_always.jpg": 3,
        }, "server-side request counts show the retries"
        assert {k: v for k, v in errors.items() if v == ""}.keys() == {"good.jpg", "flaky500.jpg", "cut_once.jpg"}
        assert errors["dead500.jpg"] == "http 500"
        size = len(site.images["cut_always.jpg"])
        assert errors["cut_always.jpg"] == f"truncated body: got {size // 2} of {size} bytes"
        assert first.summary[["new", "skipped", "failed"]].values.tolist() == [[3, 0, 2]]
        for row in stored_log[stored_log["sha256"] != ""].itertuples():
            assert incoming(workspace, row.sha256, row.ext).read_bytes() == site.images[row.url.rsplit("/", 1)[1]]
        assert len([p for p in workspace.incoming.rglob("*") if p.is_file()]) == 3
        no_half_written_files(workspace)

        catalog = ingest(workspace, first.log, IngestConfig(min_side=16))
        assert (catalog["status"] == "ok").all() and len(catalog) == 3
        no_half_written_files(workspace)

        site.fail_first, site.truncate_first = {}, {}
        second = crawl_sources(workspace, sources)
    assert second.summary[["new", "skipped", "failed"]].values.tolist() == [[2, 3, 0]]
    no_half_written_files(workspace)


def test_a_server_that_never_answers_times_out_is_retried_and_logged(workspace: Workspace, tmp_path: Path) -> None:
    site = LoopbackSite({"slow.jpg": jpeg(tmp_path, 0)})
    site.stalled = {"slow.jpg"}  # held unanswered until the site stops: the read timeout fires however long it is
    with site.serve() as endpoint:
        urls = _url_list(tmp_path, [endpoint.split("/search")[0] + "/img/slow.jpg"])
        result = crawl_sources(workspace, loopback_sources(urls=[urls], request_timeout_s=0.5, max_retries=2))
        assert site.wait_for_hits("slow.jpg", 3), f"the server saw {site.hits['slow.jpg']} of 3 requests"
        assert site.hits["slow.jpg"] == 3, "timeouts are retried: max_retries=2 means three requests"
    error = read_crawl_log(workspace)["error"].tolist()
    assert len(error) == 1 and error[0].startswith("ReadTimeout:") and "read timeout=0.5" in error[0], error
    assert result.summary[["new", "skipped", "failed"]].values.tolist() == [[0, 0, 1]]
    assert not [p for p in workspace.incoming.rglob("*") if p.is_file()]


def test_body_shorter_than_content_length_is_never_returned(tmp_path: Path) -> None:
    site = LoopbackSite({"a.jpg": jpeg(tmp_path, 1)})
    site.truncate_first = {"a.jpg": 1}
    with site.serve() as endpoint, requests.Session() as session:
        url = endpoint.split("/search")[0] + "/img/a.jpg"
        once = loopback_sources(max_retries=0)
        assert fetch.fetch_bytes(session, url, once) == (
            None,
            f"truncated body: got {len(site.images['a.jpg']) // 2} of {len(site.images['a.jpg'])} bytes",
        )
        assert fetch.fetch_bytes(session, url, once) == (site.images["a.jpg"], "")


# --------------------------------------------------------------------------------------------------------------
# A total deadline per download, and a declared length over the cap refused before reading


@contextlib.contextmanager
def _raw_site(answer: Any) -> Iterator[str]:
    """A loopback server whose every GET is answered by answer(handler); yields its base URL; counts requests
    (answer.hits) and sets answer.seen once it has one."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            answer.hits += 1
            answer.seen.set()
            try:
                answer(self)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up
                self.close_connection = True

    answer.hits, answer.seen = 0, threading.Event()
    with serving(ThreadingHTTPServer(("127.0.0.1", 0), Handler)) as port:
        yield f"http://127.0.0.1:{port}"


def test_a_server_trickling_bytes_hits_the_total_deadline() -> None:
    stop = threading.Event()

    def trickle(handler: BaseHTTPRequestHandler) -> None:
        """A byte every 0.05 s for as long as the client reads (the body never ends): no read waits long."""
        handler.send_response(200)
        handler.send_header("Content-Length", str(1_000_000))
        handler.end_headers()
        while not stop.is_set():
            handler.wfile.write(b"x")
            handler.wfile.flush()
            stop.wait(0.05)

    # Whatever the machine's speed, the download ends at its 1.5 s deadline: between reads, or in a read whose
    # timeout (never longer than what is left of the deadline) fires, after which no retry may start.
    with _raw_site(trickle) as base, requests.Session() as session:
        try:
            sources = loopback_sources(download_timeout_s=1.5, max_retries=2)
            data, error = fetch.fetch_bytes(session, f"{base}/slow.jpg", sources)
            assert trickle.seen.wait(120), "the server never saw the request"
        finally:
            stop.set()  # the handler ends before the server stops
    assert data is None, "a download must not outlive its deadline however steadily the bytes trickle"
    assert "took longer than 1.5 s in all" in error, error
    assert trickle.hits == 1, "a download that ran out of time is not retried"


# A server that sends a long status line (or header) one byte per interval needs at least TRICKLED_BYTES *
# TRICKLE_INTERVAL_S = 60 s for it (each pause is a wait on the test's stop event, which only ends it sooner): a
# download with a 2 s deadline must give up long before, whatever the machine's load.
TRICKLE_INTERVAL_S = 0.2
TRICKLED_BYTES = 300
TRICKLE_S = TRICKLED_BYTES * TRICKLE_INTERVAL_S


def _trickle(handler: BaseHTTPRequestHandler, stop: threading.Event, line: bytes, rest: bytes) -> bool:
    """Send line one byte per TRICKLE_INTERVAL_S, then rest; False if the test stopped it first."""
    for byte in line:
        if stop.wait(TRICKLE_INTERVAL_S):
            handler.close_connection = True
            return False
        handler.wfile.write(bytes([byte]))
        handler.wfile.flush()
    handler.wfile.write(rest)
    handler.wfile.flush()
    return True


@pytest.mark.parametrize("through_proxy", [False, True], ids=["direct", "through-an-http-proxy"])
def test_a_server_trickling_its_status_line_is_cut_off_at_the_deadline(through_proxy: bool) -> None:
    stop, finished = threading.Event(), threading.Event()

    def slow_status(handler: BaseHTTPRequestHandler) -> None:
        if _trickle(handler, stop, b"HTTP/1.1 200 " + b"O" * TRICKLED_BYTES + b"\r\n", b"Content-Length: 2\r\n\r\nok"):
            finished.set()

    with _raw_site(slow_status) as base, requests.Session() as session:
        session.trust_env = False
        url = f"{base}/slow.jpg"
        if through_proxy:  # the proxy is the slow one; the URL behind it is never connected to
            session.proxies = {"http": base}
            url = closed_port_url("slow.jpg")
        try:
            started = time.monotonic()
            sources = loopback_sources(download_timeout_s=2, max_retries=2)
            data, error = fetch.fetch_bytes(session, url, sources)
            elapsed, server_done = time.monotonic() - started, finished.is_set()
        finally:
            stop.set()  # the handler ends before the server stops
    assert data is None and "took longer than 2 s in all" in error, error
    assert not server_done, "the download waited for the whole status line: the deadline must cover it"
    assert elapsed < 2 + 40 < TRICKLE_S, f"a 2 s deadline took {elapsed:.1f} s"
    assert slow_status.hits == 1, "a download that ran out of time is not retried"


def test_a_tls_handshake_trickled_byte_by_byte_is_cut_off_at_the_deadline() -> None:
    stop, finished = threading.Event(), threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def handle(self) -> None:  # plain TCP: a "TLS server" announcing a 16 KiB handshake record, sent slowly
            self.connection.recv(4096)  # the ClientHello
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                if _trickle(self, stop, b"\x16\x03\x03\x40\x00" + b"\x02" * TRICKLED_BYTES, b""):
                    finished.set()

    with serving(ThreadingHTTPServer(("127.0.0.1", 0), Handler)) as port, requests.Session() as session:
        session.trust_env = False
        try:
            sources = loopback_sources(download_timeout_s=2, max_retries=1)
            data, error = fetch.fetch_bytes(session, f"https://127.0.0.1:{port}/slow.jpg", sources)
            server_done = finished.is_set()
        finally:
            stop.set()
    assert data is None and "took longer than 2 s in all" in error, error
    assert not server_done, "the download waited for the whole handshake: its timeout must be what is left, at most"


def test_a_crawl_is_not_held_by_a_server_trickling_its_headers(workspace: Workspace, tmp_path: Path) -> None:
    stop, finished = threading.Event(), threading.Event()
    image = jpeg(tmp_path, 1)

    def site(handler: BaseHTTPRequestHandler) -> None:
        if handler.path.endswith("/ok.jpg"):
            handler.send_response(200)
            handler.send_header("Content-Length", str(len(image)))
            handler.end_headers()
            handler.wfile.write(image)
        elif _trickle(handler, stop, b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * TRICKLED_BYTES, b"\r\n\r\n"):
            finished.set()

    with _raw_site(site) as base:
        try:
            sources = loopback_sources(urls=[_url_list(tmp_path, [f"{base}/slow.jpg", f"{base}/ok.jpg"])],
                                       download_timeout_s=2, max_retries=1)  # fmt: skip
            result = crawl_sources(workspace, sources)
            server_done = finished.is_set()
        finally:
            stop.set()
    errors = _names_and_errors(result.log)
    assert errors["ok.jpg"] == "" and "took longer than 2 s in all" in errors["slow.jpg"], errors
    assert not server_done, "the crawl waited for the trickling server"


def test_a_declared_length_over_the_cap_is_refused_before_reading() -> None:
    def huge(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", str(fetch.MAX_DOWNLOAD_BYTES + 1))
        handler.end_headers()
        handler.wfile.write(b"\xff\xd8\xff" + b"\0" * 1000)
        handler.wfile.flush()
        handler.close_connection = True

    with _raw_site(huge) as base, requests.Session() as session:
        data, error = fetch.fetch_bytes(session, f"{base}/huge.jpg", loopback_sources(max_retries=2))
    assert data is None and f"declared Content-Length {fetch.MAX_DOWNLOAD_BYTES + 1}" in error, error
    assert huge.hits == 1, "refused at once, not read, not retried"
