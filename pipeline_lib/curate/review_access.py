"""Who may use the review page: loopback or a token, its own Host only, same-origin JSON posts, bounded bodies."""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import secrets
import socket
from collections.abc import Awaitable, Callable, MutableMapping
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import parse_qs, urlsplit

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024  # the page's JSON posts are a few hundred bytes
TOKEN_COOKIE = "aidetect_review_token"
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def is_loopback(host: str) -> bool:
    """Whether a listen address or host name stays on this machine."""
    name = host.strip("[]").lower()
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def access_token(host: str) -> str | None:
    """A fresh random token when the page listens on anything but loopback (then every request must carry it)."""
    return None if is_loopback(host) else secrets.token_urlsafe(18)


def page_url(base: str, token: str | None) -> str:
    """The URL to open: base, with ?token=... when the page needs one."""
    return f"{base}?token={token}" if token else base


def exposure_warning(host: str) -> str:
    """What a user must know when the page listens beyond loopback."""
    return (
        f"the review page listens on {host}, not only on this machine: anyone who can reach it and has the URL "
        "(it carries a random token) can decide images. Use --host 127.0.0.1 unless you need that"
    )


def _headers(scope: Scope) -> dict[str, str]:
    return {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope.get("headers", [])}


def _split_host(value: str) -> tuple[str, int | None]:
    """('name', port) of a Host header value (IPv6 in brackets); port None when absent or malformed."""
    try:
        parts = urlsplit(f"//{value}")
        return (parts.hostname or "").lower(), parts.port
    except ValueError:
        return "", -1


class RequestGuard:
    """ASGI middleware: the page's own Host only, same-origin state changes, a token off loopback, bounded bodies.

    - Host: the name must be the address the request came in on (or localhost on loopback, or this machine's name
      when listening beyond loopback) and the port the server's: a DNS-rebinding page's Host is refused.
    - POST: an Origin (or Sec-Fetch-Site) from another site is refused, and the body must be JSON.
    - token: when set, every request carries it (?token= on the page URL, then an HttpOnly SameSite cookie).
    - bodies over MAX_BODY_BYTES get 413 before more is read.
    """

    def __init__(self, app: Callable[..., Awaitable[None]], token: str | None, extra_hosts: frozenset[str]) -> None:
        self.app = app
        self.token = token
        self.extra_hosts = extra_hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        problem = self._host_problem(scope, headers) or self._origin_problem(scope, headers)
        problem = problem or self._token_problem(scope, headers)
        if problem:
            await _reply(send, problem[0], problem[1])
            return
        body = await _bounded_body(scope, headers, receive)
        if body is None:
            await _reply(send, 413, f"request body larger than {MAX_BODY_BYTES} bytes")
            return
        await self.app(scope, _replay(body, receive), self._with_cookie(scope, send))

    def _allowed_names(self, scope: Scope) -> set[str]:
        server = scope.get("server") or ("", None)
        names = {str(server[0]).lower()} | set(self.extra_hosts)
        if is_loopback(str(server[0])):
            names |= LOOPBACK_NAMES
        else:
            names |= {socket.gethostname().lower(), socket.getfqdn().lower()}
        return names

    def _host_problem(self, scope: Scope, headers: dict[str, str]) -> tuple[int, str] | None:
        name, port = _split_host(headers.get("host", ""))
        server_port = (scope.get("server") or ("", None))[1]
        expected_port = port if port is not None else (443 if scope.get("scheme") == "https" else 80)
        if name not in self._allowed_names(scope) or (server_port is not None and expected_port != server_port):
            log.warning("review page: refused a request for Host %r", headers.get("host", ""))
            return 421, "this page only answers for its own address (Host header refused)"
        return None

    def _origin_problem(self, scope: Scope, headers: dict[str, str]) -> tuple[int, str] | None:
        if scope.get("method") in ("GET", "HEAD"):
            return None
        own = f"{scope.get('scheme', 'http')}://{headers.get('host', '')}".lower()
        origin = headers.get("origin")
        if origin is not None and origin.lower() != own:
            return 403, f"cross-origin request refused (Origin {origin!r})"
        if headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
            return 403, "cross-site request refused"
        if headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            return 415, "state changes take a JSON body (Content-Type: application/json)"
        return None

    def _token_problem(self, scope: Scope, headers: dict[str, str]) -> tuple[int, str] | None:
        if self.token is None:
            return None
        query = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [""])[0]
        cookie = SimpleCookie(headers.get("cookie", "")).get(TOKEN_COOKIE)
        given = [query, cookie.value if cookie is not None else ""]
        if any(value and hmac.compare_digest(value, self.token) for value in given):
            return None
        return 403, "this review page needs its token: open the URL it printed (…/?token=…)"

    def _with_cookie(self, scope: Scope, send: Send) -> Send:
        """send(), adding the token cookie to the page's response so that its later requests carry it."""
        if self.token is None or scope.get("path") != "/":
            return send
        cookie = f"{TOKEN_COOKIE}={self.token}; HttpOnly; SameSite=Strict; Path=/"

        async def sending(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = dict(message, headers=[*message.get("headers", []), (b"set-cookie", cookie.encode())])
            await send(message)

        return sending


async def _bounded_body(scope: Scope, headers: dict[str, str], receive: Receive) -> bytes | None:
    """The whole request body, or None as soon as it (declared or received) exceeds MAX_BODY_BYTES."""
    try:
        declared = int(headers.get("content-length", "0") or 0)
    except ValueError:
        declared = 0
    if declared > MAX_BODY_BYTES:
        return None
    body, more = b"", scope.get("method") not in ("GET", "HEAD")
    while more:
        message = await receive()
        if message["type"] != "http.request":
            break
        body += message.get("body", b"")
        more = bool(message.get("more_body"))
        if len(body) > MAX_BODY_BYTES:
            return None
    return body


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive() that hands the app the body read already, then waits for the client as before."""
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _reply(send: Send, status: int, detail: str) -> None:
    """A small JSON error response (the page shows `detail`)."""
    body = json.dumps({"detail": detail}).encode("utf-8")
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
