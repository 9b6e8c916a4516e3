"""URL safety: only http(s) to resolvable public hosts unless private addresses are allowed."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote

import pytest

from pipeline_lib.acquire.crawl import crawl_sources
from pipeline_lib.acquire.crawl_log import read_crawl_log, read_searches
from pipeline_lib.acquire.crawl_state import detect_ext
from pipeline_lib.acquire.safety import UnsafeUrlError, check_url, is_public_link
from pipeline_lib.core.config import SourcesConfig
from pipeline_lib.core.workspace import Workspace, file_sha256
from tests.conftest import make_image
from tests.loopback import REQUEST_TIMEOUT_S, LoopbackSite


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://127.0.0.1:8000/a.jpg", "loopback"),
        ("http://localhost/a.jpg", "loopback"),
        ("http://[::1]/a.jpg", "loopback"),
        ("http://10.1.2.3/a.jpg", "private"),
        ("https://192.168.0.10/a.jpg", "private"),
        ("http://172.16.5.4/a.jpg", "private"),
        ("http://169.254.169.254/latest/meta-data", "link-local"),
        ("http://224.0.0.1/a.jpg", "multicast"),
        ("http://240.0.0.1/a.jpg", "reserved"),
        ("http://0.0.0.0/a.jpg", "unspecified"),
        ("http://[::ffff:127.0.0.1]/a.jpg", "loopback"),
        ("http://100.64.0.1/a.jpg", "address"),
    ],
)
def test_non_public_addresses_are_rejected(url: str, reason: str) -> None:
    with pytest.raises(UnsafeUrlError) as info:
        check_url(url, allow_private=False)
    message = str(info.value)
    assert url in message
    assert reason in message


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000/a.jpg", "http://localhost/x.png", "http://10.0.0.1/a.jpg"])
def test_private_addresses_are_allowed_with_the_flag(url: str) -> None:
    check_url(url, allow_private=True)


def test_public_literal_address_is_allowed() -> None:
    check_url("https://93.184.216.34/photo.jpg", allow_private=False)


@pytest.mark.parametrize(
    "url", ["ftp://93.184.216.34/a.jpg", "file:///etc/passwd", "javascript:alert(1)", "gopher://127.0.0.1/"]
)
def test_other_schemes_are_rejected_even_with_the_flag(url: str) -> None:
    with pytest.raises(UnsafeUrlError, match="not http or https"):
        check_url(url, allow_private=True)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http:///a.jpg", "no host"),
        ("http://93.184.216.34:99999/a.jpg", "malformed"),
        ("http://no-such-host.invalid/a.jpg", "does not resolve"),
    ],
)
def test_malformed_or_unresolvable_urls_are_rejected(url: str, reason: str) -> None:
    with pytest.raises(UnsafeUrlError, match=reason):
        check_url(url, allow_private=True)


def test_unsafe_url_error_is_a_value_error() -> None:
    assert issubclass(UnsafeUrlError, ValueError)


@pytest.mark.parametrize(
    ("url", "linked"),
    [
        ("https://upload.wikimedia.org/a.jpg", True),
        ("http://93.184.216.34/a.jpg", True),
        ("http://127.0.0.1:47811/images/a.jpg", False),  # the demo's loopback search site: dead once it ends
        ("http://localhost:8000/a.jpg", False),
        ("http://photos.localhost/a.jpg", False),
        ("http://[::1]/a.jpg", False),
        ("http://192.168.1.20/a.jpg", False),
        ("http://nas.local/a.jpg", False),
        ("http://intranet/a.jpg", False),
        ("file:///etc/passwd", False),
        ("javascript:alert(1)", False),
        ("http://93.184.216.34:99999/a.jpg", False),
        ("", False),
    ],
)
def test_only_public_http_urls_become_links_without_a_dns_lookup(url: str, linked: bool) -> None:
    assert is_public_link(url) is linked, url


# --------------------------------------------------------------------------------------------------------------
# Keywords and remote file names are data, never paths: files are named by their sha256 only

HOSTILE_KEYWORDS = [
    "../../../../etc/passwd",
    "/etc/passwd",
    "bell\x07nul\x00esc\x1b[31m tab\tnewline\nend",
    "<script>alert('x')</script>",
    "名前" * 50,
    "C:\\Windows\\System32\\..\\evil",
]
HOSTILE_NAMES = [
    "../../../../etc/passwd.jpg",
    "/abs/olute.jpg",
    "ctl\x01\x7f.jpg",
    "<script>.jpg",
    "n" * 300 + ".jpg",
    "..\\..\\win.jpg",
]


def test_hostile_keywords_and_remote_names_never_become_paths(workspace: Workspace, tmp_path: Path) -> None:
    images = {
        name: make_image(tmp_path / "src" / f"{i}.jpg", seed=i).read_bytes() for i, name in enumerate(HOSTILE_NAMES)
    }
    site = LoopbackSite(images)
    site.listing = {keyword: [name] for keyword, name in zip(HOSTILE_KEYWORDS, HOSTILE_NAMES, strict=True)}
    before = {p for p in tmp_path.rglob("*")}
    with site.serve() as endpoint:
        search = {"engine": "bing", "endpoint": endpoint, "keywords": HOSTILE_KEYWORDS, "max_num": 10, "threads": 2}
        sources = SourcesConfig.model_validate(
            {"allow_private_addresses": True, "request_timeout_s": REQUEST_TIMEOUT_S, "search": [search]}
        )
        result = crawl_sources(workspace, sources)

    assert site.queries == HOSTILE_KEYWORDS, "keywords reach the search site intact (URL-quoted)"
    assert site.hits == dict.fromkeys(HOSTILE_NAMES, 1), "each remote name was fetched once"
    assert result.summary["keyword"].tolist() == HOSTILE_KEYWORDS
    assert result.summary["new"].sum() == len(HOSTILE_NAMES) and result.summary["failed"].sum() == 0
    stored = read_crawl_log(workspace)
    assert stored["keyword"].tolist() == HOSTILE_KEYWORDS and (stored["group"] == stored["keyword"]).all()
    assert [unquote(url.rsplit("/", 1)[1]) for url in stored["url"]] == HOSTILE_NAMES

    files = {p.relative_to(workspace.root).as_posix() for p in workspace.root.rglob("*") if p.is_file()}
    files -= {p.relative_to(workspace.root).as_posix() for p in before if p.is_relative_to(workspace.root)}
    logs = {"crawl/log.parquet", "crawl/searches.parquet"}  # the keywords are data in the logs, never paths
    expected = {f"incoming/{sha[:2]}/{sha}.jpg" for sha in stored["sha256"]} | logs
    assert files == expected
    assert read_searches(workspace)["keyword"].tolist() == HOSTILE_KEYWORDS
    for path in files - logs:
        assert file_sha256(workspace.root / path) == Path(path).stem
    created = {p for p in tmp_path.rglob("*")} - before
    assert all(p.is_relative_to(workspace.root) for p in created), "nothing is written outside the workspace"
    assert not [p for p in tmp_path.rglob("*") if "passwd" in p.name or "script" in p.name]


@pytest.mark.parametrize(
    "url",
    [
        "http://h/x/../../etc/passwd",
        "http://h/a.%2e%2e%2fetc",
        "http://h/a.ph\x00p",
        "http://h/a.toolongext",
        "http://h/..",
        "http://h/a.j/pg",
    ],
)
def test_remote_names_never_give_an_unsafe_extension(url: str) -> None:
    assert detect_ext(b"<html>not an image</html>", url) == "bin"


# --------------------------------------------------------------------------------------------------------------
# The connection goes to the address that passed the check (DNS rebinding)
#
# A rebinding DNS server cannot exist here, so socket.getaddrinfo is replaced by a stub resolver: the first lookup
# of the name gives one answer, every later lookup another. Public addresses are never connected to: the stub
# refuses to resolve them (as a machine without network would), so no packet leaves the machine.

PUBLIC = "93.184.216.34"


class RebindingResolver:
    """getaddrinfo stub: `name` resolves to first, then to later; PUBLIC (a literal) is refused."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str, first: str, later: str) -> None:
        import socket

        self.real = socket.getaddrinfo
        self.name, self.first, self.later = name, first, later
        self.lookups: list[str] = []
        self.public_connects = 0
        monkeypatch.setattr(socket, "getaddrinfo", self)

    def __call__(self, host, port, *args, **kwargs):
        import socket

        if host == self.name:  # the name: answered by the "DNS server"
            self.lookups.append(host)
            return self.real(self.first if len(self.lookups) == 1 else self.later, port, *args, **kwargs)
        if host == PUBLIC:  # a connection to the public literal: refused, nothing leaves the machine
            self.public_connects += 1
            raise socket.gaierror(socket.EAI_NONAME, "no network in tests")
        return self.real(host, port, *args, **kwargs)


def _site(tmp_path: Path) -> LoopbackSite:
    return LoopbackSite({"a.jpg": make_image(tmp_path / "a.jpg", seed=1).read_bytes()})


def test_a_name_that_rebinds_to_loopback_is_never_connected_to(monkeypatch, tmp_path: Path) -> None:
    import requests

    from pipeline_lib.acquire.fetch import fetch_bytes

    site = _site(tmp_path)
    with site.serve() as endpoint:
        port = endpoint.split(":")[2].split("/")[0]
        resolver = RebindingResolver(monkeypatch, "rebind.test", PUBLIC, "127.0.0.1")
        sources = SourcesConfig(allow_private_addresses=False, request_timeout_s=REQUEST_TIMEOUT_S, max_retries=0)
        with requests.Session() as session:
            session.trust_env = False  # no proxy from the environment: the connection is ours to pin
            data, error = fetch_bytes(session, f"http://rebind.test:{port}/img/a.jpg", sources)
    assert site.hits["a.jpg"] == 0, "the check saw a public address: nothing may reach 127.0.0.1"
    assert data is None and resolver.public_connects == 1, "the connection went to the address that was checked"
    assert resolver.lookups == ["rebind.test"], "the name is resolved once, by the check; the connection is pinned"


def test_every_redirect_hop_is_pinned_to_its_checked_address(monkeypatch, tmp_path: Path) -> None:
    import requests

    from pipeline_lib.acquire.fetch import fetch_bytes

    site = _site(tmp_path)
    with site.serve() as endpoint:
        port = endpoint.split(":")[2].split("/")[0]
        redirect = LoopbackSite({})
        redirect.answer_image = lambda handler, name: _redirect(handler, f"http://hop.test:{port}/img/a.jpg")
        with redirect.serve() as first:
            start = first.split("/search")[0] + "/img/start.jpg"
            resolver = RebindingResolver(monkeypatch, "hop.test", "127.0.0.1", PUBLIC)
            sources = SourcesConfig(allow_private_addresses=True, request_timeout_s=REQUEST_TIMEOUT_S, max_retries=0)
            with requests.Session() as session:
                session.trust_env = False
                data, error = fetch_bytes(session, start, sources)
    assert (data, error) == (site.images["a.jpg"], ""), error
    assert resolver.lookups == ["hop.test"] and resolver.public_connects == 0


def _redirect(handler, location: str) -> None:
    handler.send_response(302)
    handler.send_header("Location", location)
    handler.send_header("Content-Length", "0")
    handler.end_headers()


def test_https_keeps_the_name_for_sni_and_the_certificate_while_connecting_to_the_pinned_address(
    monkeypatch, tmp_path: Path
) -> None:
    import ssl
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import requests

    from pipeline_lib.acquire.fetch import fetch_bytes
    from pipeline_lib.ops.demo_data import serving

    cert, key = _self_signed(tmp_path, "pinned.test")
    image = make_image(tmp_path / "b.jpg", seed=2).read_bytes()
    seen_sni: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", str(len(image)))
            self.end_headers()
            self.wfile.write(image)

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.sni_callback = lambda sock, name, ctx: seen_sni.append(name)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    with serving(server) as port:
        resolver = RebindingResolver(monkeypatch, "pinned.test", "127.0.0.1", PUBLIC)
        sources = SourcesConfig(allow_private_addresses=True, request_timeout_s=REQUEST_TIMEOUT_S, max_retries=0)
        with requests.Session() as session:
            session.trust_env = False  # else REQUESTS_CA_BUNDLE from the environment overrides session.verify
            session.verify = str(cert)
            data, error = fetch_bytes(session, f"https://pinned.test:{port}/img/b.jpg", sources)
    assert (data, error) == (image, ""), error
    assert seen_sni == ["pinned.test"] and resolver.lookups == ["pinned.test"]


def _self_signed(folder: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for name (and its key), as PEM files."""
    import datetime

    pytest.importorskip("cryptography")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path
