"""URL safety checks before any download (SSRF protection for crawled URLs)."""

from __future__ import annotations

import ipaddress
import logging
import socket
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

ALLOWED_SCHEMES: tuple[str, ...] = ("http", "https")


class UnsafeUrlError(ValueError):
    """A URL must not be fetched: wrong scheme, unresolvable host or a non-public address."""


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _non_public_reason(address: IPAddress) -> str:
    """Why an address is not a public one ("" if it is public)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return _non_public_reason(address.ipv4_mapped)
    checks = (
        ("is_loopback", "loopback"),
        ("is_unspecified", "unspecified"),
        ("is_link_local", "link-local"),
        ("is_multicast", "multicast"),
        ("is_reserved", "reserved"),
        ("is_private", "private"),
    )
    for attribute, reason in checks:
        if getattr(address, attribute):
            return f"{reason} address {address}"
    if not address.is_global:
        return f"non-global address {address}"
    return ""


def resolve_host(host: str, port: int | None) -> list[IPAddress]:
    """Every address a host name (or literal IP) resolves to; OSError when the name does not resolve."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    infos = socket.getaddrinfo(host, port or 0, proto=socket.IPPROTO_TCP)
    addresses = []
    for info in infos:
        text = str(info[4][0]).split("%", 1)[0]  # drop an IPv6 zone id
        addresses.append(ipaddress.ip_address(text))
    return addresses


def check_url(url: str, allow_private: bool) -> None:
    """Raise UnsafeUrlError (naming url and reason) unless url is http(s) to a resolvable, allowed host."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:
        raise UnsafeUrlError(f"unsafe url {url!r}: malformed ({error})") from None
    scheme = parts.scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        raise UnsafeUrlError(f"unsafe url {url!r}: scheme {scheme or '<none>'!r} is not http or https")
    host = parts.hostname
    if not host:
        raise UnsafeUrlError(f"unsafe url {url!r}: no host")
    try:
        addresses = resolve_host(host, port)
    except (OSError, UnicodeError) as error:
        raise UnsafeUrlError(f"unsafe url {url!r}: host {host!r} does not resolve ({error})") from None
    if not addresses:
        raise UnsafeUrlError(f"unsafe url {url!r}: host {host!r} does not resolve")
    if allow_private:
        return
    for address in addresses:
        reason = _non_public_reason(address)
        if reason:
            raise UnsafeUrlError(
                f"unsafe url {url!r}: host {host!r} resolves to a {reason} "
                "(set sources.allow_private_addresses: true to allow it)"
            )
