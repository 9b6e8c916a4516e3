"""URL safety checks before any download (SSRF protection for crawled URLs), and connections pinned to the
address that passed the check (no second DNS lookup that a rebinding name could answer differently)."""

from __future__ import annotations

import ipaddress
import logging
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import urllib3.poolmanager
from requests import PreparedRequest
from requests.adapters import HTTPAdapter
from requests.utils import select_proxy

from pipeline_lib.acquire.deadline import WATCHED_POOLS

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


# Names that never reach a public host: RFC 6761/6762, RFC 8375 and common intranet suffixes.
LOCAL_NAME_SUFFIXES: tuple[str, ...] = (".localhost", ".local", ".internal", ".home.arpa", ".lan")


def _local_name_reason(host: str) -> str:
    """Why a host, by its name or literal address alone (no DNS lookup), is not a public one ("" if it may be)."""
    name = host.lower().rstrip(".")
    try:
        return _non_public_reason(ipaddress.ip_address(name.split("%", 1)[0]))
    except ValueError:
        pass
    if name == "localhost" or name.endswith(LOCAL_NAME_SUFFIXES):
        return f"local name {host}"
    return "" if "." in name else f"single-label name {host}"


def is_public_link(url: str) -> bool:
    """Whether url is http(s) to a host that may be public, judged by the URL alone (no DNS lookup): what a page may
    show as a link. Loopback, private and other non-public literal addresses, localhost and local names are not."""
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError for a malformed port
    except ValueError:
        return False
    host = parts.hostname
    return parts.scheme.lower() in ALLOWED_SCHEMES and bool(host) and not _local_name_reason(str(host))


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


@dataclass(frozen=True)
class CheckedUrl:
    """A URL that passed check_url: its host name, port and the address the connection must go to."""

    url: str
    host: str
    port: int | None
    address: IPAddress


def check_url(url: str, allow_private: bool) -> CheckedUrl:
    """The URL's checked address; UnsafeUrlError (naming url and reason) unless it is http(s) to an allowed host.

    Every address the name resolves to must be allowed; the first one is where the connection goes.
    """
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
    if not allow_private:
        for address in addresses:
            reason = _non_public_reason(address)
            if reason:
                raise UnsafeUrlError(
                    f"unsafe url {url!r}: host {host!r} resolves to a {reason} "
                    "(set sources.allow_private_addresses: true to allow it)"
                )
    return CheckedUrl(url, host, port, addresses[0])


def _host_header(checked: CheckedUrl) -> str:
    """The Host header of the URL (the name, not the pinned address)."""
    name = f"[{checked.host}]" if ":" in checked.host else checked.host
    return f"{name}:{checked.port}" if checked.port is not None else name


class PinnedAdapter(HTTPAdapter):
    """A requests adapter that checks every request's URL (each redirect hop too: requests sends each through
    the adapter) and connects to the address that passed the check, keeping the URL's name for the Host header,
    TLS SNI and certificate check. Mount it for http:// and https:// on every session that fetches crawled URLs.

    Behind a configured proxy the proxy resolves the name; the URL is still checked, the connection not pinned.
    """

    def __init__(self, allow_private: bool, **kwargs: Any) -> None:
        self.allow_private = allow_private
        super().__init__(**kwargs)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        """requests' pool manager, with pools whose connections a download's deadline reaches (deadline.py)."""
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = WATCHED_POOLS

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        """requests' proxy manager; an HTTP(S) proxy's pools are watched too (a SOCKS proxy keeps its own pools)."""
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if manager.pool_classes_by_scheme is urllib3.poolmanager.pool_classes_by_scheme:
            manager.pool_classes_by_scheme = WATCHED_POOLS
        return manager

    def get_connection_with_tls_context(
        self, request: PreparedRequest, verify: Any, proxies: dict[str, str] | None = None, cert: Any = None
    ) -> Any:
        """The pool of the checked address (not of a fresh DNS lookup of the name)."""
        checked = check_url(str(request.url), self.allow_private)
        if select_proxy(str(request.url), proxies):
            return super().get_connection_with_tls_context(request, verify, proxies=proxies, cert=cert)
        host_params, pool_kwargs = self.build_connection_pool_key_attributes(request, verify, cert)
        host_params = dict(host_params, host=str(checked.address))
        if host_params.get("scheme") == "https":
            pool_kwargs = dict(pool_kwargs, server_hostname=checked.host, assert_hostname=checked.host)
        request.headers["Host"] = _host_header(checked)
        return self.poolmanager.connection_from_host(**host_params, pool_kwargs=pool_kwargs)


def pin_session(session: Any, allow_private: bool, **adapter_kwargs: Any) -> Any:
    """Mount PinnedAdapter (adapter_kwargs: e.g. pool_maxsize) on a requests session for http and https, unless
    one with the same allow_private is there already; return the session."""
    for prefix in ("http://", "https://"):
        adapter = session.get_adapter(prefix)
        if not isinstance(adapter, PinnedAdapter) or adapter.allow_private != allow_private:
            session.mount(prefix, PinnedAdapter(allow_private, **adapter_kwargs))
    return session
