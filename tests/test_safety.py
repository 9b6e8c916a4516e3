"""URL safety: only http(s) to resolvable public hosts unless private addresses are allowed."""

from __future__ import annotations

import pytest

from pipeline_lib.safety import UnsafeUrlError, check_url


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
