"""A scriptable search site on 127.0.0.1 for crawl tests: Bing-, Google- or Baidu-format result pages, a Flickr-like
REST API (/services/rest/), plus images.

Image answers can be made to fail: the first N requests with HTTP 500, every request held unanswered for as long
as the site serves (the client must time out, however fast or slow the machine), or with a truncated body
(Content-Length larger than the bytes sent, then the connection closes). Every request is counted per image name,
so tests can see the retries from the server's side, and can wait until the server has seen them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import string
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from icrawler.builtin.baidu import BaiduParser

from pipeline_lib.ops.demo_data import result_page as bing_result_page
from pipeline_lib.ops.demo_data import serving

log = logging.getLogger(__name__)

# A request timeout for clients of these servers that never fires on a loaded machine: a test that needs a timeout
# to fire holds the answer back instead (LoopbackSite.stalled).
REQUEST_TIMEOUT_S = 60
PageFormat = Callable[[list[str]], str]


def google_result_page(image_urls: list[str]) -> str:
    """A Google-images-like page: the image URLs sit in an AF_initDataCallback <script> (what GoogleParser reads)."""
    entries = [
        [1, [0, f"tbn{i}", [f"https://encrypted-tbn0.gstatic.com/images?q=tbn:{i}", 60, 80], [url, 600, 800]]]
        for i, url in enumerate(image_urls)
    ]
    data = json.dumps([None, [[entries]]]).replace("/", "\\u002f")  # Google escapes slashes like this
    script = f"AF_initDataCallback({{key: 'ds:1', hash: '2', data:{data}, sideChannel: {{}}}});"
    head = "<!doctype html><html><head><meta charset='utf-8'><title>results - Google Search</title></head>"
    return f"{head}<body><div id='islrg'></div><script nonce='x'>{script}</script></body></html>"


def changed_google_page(image_urls: list[str]) -> str:
    """Google after a redesign: the image URLs only as <img> attributes, no <script> holding them."""
    items = "".join(f"<div class='tile'><img data-src='{url}'></div>" for url in image_urls)
    return f"<!doctype html><html><head><script>var x = 1;</script></head><body>{items}</body></html>"


# Baidu's objURL cipher: icrawler's own decoder (BaiduParser._decode_url, ciphertext -> plaintext) inverted per char.
_BAIDU_CHARS = {BaiduParser._decode_url(None, char): char for char in string.ascii_lowercase + string.digits}
_BAIDU_WORDS = {":": "_z2C$q", ".": "_z&e3B", "/": "AzdH3F"}


def baidu_obj_url(url: str) -> str:
    """A URL enciphered the way Baidu's acjson answers give objURL."""
    enciphered = "".join(_BAIDU_CHARS.get(char, char) for char in url)
    for plain, cipher in _BAIDU_WORDS.items():
        enciphered = enciphered.replace(plain, cipher)
    return enciphered


def baidu_result_page(image_urls: list[str]) -> str:
    """A Baidu acjson answer: items with an enciphered objURL (the last one only a hoverURL) and an empty item."""
    items: list[dict[str, str]] = [{"objURL": baidu_obj_url(url), "fromPageTitle": "x"} for url in image_urls[:-1]]
    items += [{"hoverURL": url} for url in image_urls[-1:]]
    return json.dumps({"queryExt": "q", "listNum": len(items), "data": [*items, {}]})


class LoopbackSite:
    """Serve `images` under /img/<name> and a result page listing all of them (or `listing[query]`) at offset 0.

    fail_first[name] = N answers the first N requests of that image with HTTP 500; a name in stalled is never
    answered while the site serves (held until serve() ends); truncate_first[name] = N sends only half the body
    (with the full Content-Length) N times.
    """

    __test__ = False

    def __init__(self, images: dict[str, bytes], page: PageFormat = bing_result_page) -> None:
        self.images = images
        self.page = page
        self.fail_first: dict[str, int] = {}
        self.stalled: set[str] = set()
        self.truncate_first: dict[str, int] = {}
        self.hits: Counter[str] = Counter()
        self.queries: list[str] = []
        self.search_paths: list[str] = []
        self.listing: dict[str, list[str]] | None = None  # query -> image names (default: all of them)
        self.api_calls: list[dict[str, str]] = []  # Flickr REST calls (query parameters)
        self.connections: set[tuple[str, int]] = set()  # client (address, port) of every request: one per connection
        self._lock = threading.Lock()
        self._counted = threading.Condition(self._lock)  # notified on every image request
        self._release = threading.Event()  # set when serve() ends: stalled requests are let go

    def _count(self, name: str) -> int:
        with self._counted:
            self.hits[name] += 1
            self._counted.notify_all()
            return self.hits[name]

    def wait_for_hits(self, name: str, n: int, timeout: float = 120.0) -> bool:
        """Wait until the server has seen n requests of image name (a client may give up before the server
        reads its request); False if it has not after timeout seconds."""
        with self._counted:
            return self._counted.wait_for(lambda: self.hits[name] >= n, timeout)

    def answer_search(self, handler: BaseHTTPRequestHandler, base: str) -> None:
        """A result page (empty past the first page) in this site's format."""
        parts = urlsplit(handler.path)
        query = parse_qs(parts.query)
        with self._lock:
            self.queries.append(query.get("q", [""])[0])
            self.search_paths.append(handler.path)
        first = query.get("first", query.get("start", ["0"]))[0]
        everything = list(self.images) if self.listing is None else self.listing.get(query.get("q", [""])[0], [])
        names = everything if first == "0" else []
        body = self.page([f"{base}/img/{quote(name, safe='')}" for name in names]).encode()
        _send(handler, 200, body)

    def answer_flickr(self, handler: BaseHTTPRequestHandler, base: str) -> None:
        """flickr.photos.search (photo ids = image names, page 1 only) and flickr.photos.getSizes, as Flickr's JSON."""
        params = {key: values[0] for key, values in parse_qs(urlsplit(handler.path).query).items()}
        with self._lock:
            self.api_calls.append(params)
        if params.get("method") == "flickr.photos.search":
            with self._lock:
                self.queries.append(params.get("text", ""))
            names = list(self.images) if self.listing is None else self.listing.get(params.get("text", ""), [])
            photos = [{"id": name, "title": name} for name in names] if params.get("page") == "1" else []
            body = {"stat": "ok", "photos": {"page": params.get("page"), "photo": photos}}
        elif params.get("method") == "flickr.photos.getSizes":
            url = f"{base}/img/{quote(params.get('photo_id', ''), safe='')}"
            sizes = [{"label": "Square", "source": f"{url}?square"}, {"label": "Original", "source": url}]
            body = {"stat": "ok", "sizes": {"size": sizes}}
        else:
            body = {"stat": "fail", "message": f"unknown method {params.get('method')}"}
        _send(handler, 200, json.dumps(body).encode())

    def answer_image(self, handler: BaseHTTPRequestHandler, name: str) -> None:
        """The image, or the failure scripted for this request of it."""
        n = self._count(name)
        if name not in self.images:
            _send(handler, 404, b"not found")
            return
        if name in self.stalled:
            self._release.wait()  # no answer at all: the client's read timeout must fire
            handler.close_connection = True
            return
        if n <= self.fail_first.get(name, 0):
            _send(handler, 500, b"server error")
            return
        data = self.images[name]
        if n <= self.truncate_first.get(name, 0):
            handler.send_response(200)
            handler.send_header("Content-Type", "image/jpeg")
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            handler.wfile.write(data[: len(data) // 2])
            handler.wfile.flush()
            handler.close_connection = True
            return
        _send(handler, 200, data)

    @contextlib.contextmanager
    def serve(self) -> Iterator[str]:
        """Run the site on a free loopback port; yield its search endpoint template ({keyword}, {offset})."""
        site = self
        self._release = threading.Event()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet server
                log.debug("loopback site: " + format, *args)

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                with site._lock:
                    site.connections.add(self.client_address[:2])
                path = urlsplit(self.path).path
                base = f"http://127.0.0.1:{self.server.server_address[1]}"
                try:
                    if path == "/search":
                        site.answer_search(self, base)
                    elif path == "/services/rest/":
                        site.answer_flickr(self, base)
                    else:
                        site.answer_image(self, unquote(path.removeprefix("/img/")))
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                    self.close_connection = True

        with serving(ThreadingHTTPServer(("127.0.0.1", 0), Handler)) as port:
            try:
                yield f"http://127.0.0.1:{port}/search?q={{keyword}}&first={{offset}}"
            finally:
                self._release.set()  # stalled handlers end before the server stops


def _send(handler: BaseHTTPRequestHandler, status: int, body: bytes) -> None:
    handler.send_response(status)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


@contextlib.contextmanager
def serve_files(files: dict[str, bytes]) -> Iterator[tuple[str, Counter[str]]]:
    """Serve files by name on a free 127.0.0.1 port (404 for others); yield (base URL, requests per name)."""
    hits: Counter[str] = Counter()
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet server
            log.debug("loopback files: " + format, *args)

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            name = unquote(urlsplit(self.path).path.lstrip("/"))
            with lock:
                hits[name] += 1
            if name in files:
                _send(self, 200, files[name])
            else:
                _send(self, 404, b"not found")

    with serving(ThreadingHTTPServer(("127.0.0.1", 0), Handler)) as port:
        yield f"http://127.0.0.1:{port}", hits


@contextlib.contextmanager
def serve_hub(files: dict[str, bytes], announced: dict[str, str] | None = None) -> Iterator[tuple[str, Counter[str]]]:
    """A Hugging-Face-like file host on 127.0.0.1: /resolve/<name> answers HEAD and GET with a 302 to /cdn/<name>
    and announces the file's sha256 as X-Linked-Etag (announced[name] instead when given; "" announces none);
    /cdn/<name> serves the bytes. Yields (base URL, requests per path)."""
    hits: Counter[str] = Counter()
    lock = threading.Lock()
    announced = announced or {}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet server
            log.debug("loopback hub: " + format, *args)

        def _answer(self, body: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            with lock:
                hits[f"{self.command} {path}"] += 1
            name = path.rsplit("/", 1)[-1]
            if name not in files:
                _send(self, 404, b"not found" if body else b"")
            elif path.startswith("/resolve/"):
                sha256 = announced.get(name, hashlib.sha256(files[name]).hexdigest())
                self.send_response(302)
                self.send_header("Location", f"/cdn/{quote(name)}")
                if sha256:
                    self.send_header("X-Linked-Etag", f'"{sha256}"')
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif body:
                _send(self, 200, files[name])
            else:
                self.send_response(200)
                self.send_header("Content-Length", str(len(files[name])))
                self.end_headers()

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self._answer(body=True)

        def do_HEAD(self) -> None:  # noqa: N802 - http.server's name
            self._answer(body=False)

    with serving(ThreadingHTTPServer(("127.0.0.1", 0), Handler)) as port:
        yield f"http://127.0.0.1:{port}", hits


def closed_port_url(name: str) -> str:
    """An http URL on 127.0.0.1 where nothing listens (connection refused): what a download sees offline."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/{name}"
