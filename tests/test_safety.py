"""URL safety: only http(s) to resolvable public hosts unless private addresses are allowed."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote

import pytest

from pipeline_lib.config import SourcesConfig
from pipeline_lib.crawl import crawl_sources, detect_ext, read_crawl_log, read_searches
from pipeline_lib.safety import UnsafeUrlError, check_url
from pipeline_lib.workspace import Workspace, file_sha256
from tests.conftest import make_image
from tests.loopback import LoopbackSite


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


# --------------------------------------------------------------------------------------------------------------
# Keywords and remote file names are data, never paths: files are named by their sha256 only

HOSTILE_KEYWORDS = [
    "../../../../etc/passwd",
    "/etc/passwd",
    "bell\x07nul\x00esc\x1b[31m tab\tnewline\nend",
    "<script>alert('x')</script>",
    "名前" * 2000,
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
            {"allow_private_addresses": True, "request_timeout_s": 3, "search": [search]}
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
