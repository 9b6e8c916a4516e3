"""HTTP downloads of the crawl: one GET with retries, every redirect hop checked and pinned, a size cap, a total
deadline, and bodies shorter than their Content-Length never returned."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterator
from urllib.parse import urljoin

import requests
import urllib3

from pipeline_lib.acquire.deadline import Watchdog, download_deadline
from pipeline_lib.acquire.safety import UnsafeUrlError, pin_session
from pipeline_lib.core.config import SourcesConfig

REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 5
MAX_DOWNLOAD_BYTES = 256 * 1024 * 1024
BACKOFF_BASE_S = 0.2
INCOMPLETE_READ = re.compile(r"IncompleteRead\((\d+) bytes read")


def _redirect_target(response: requests.Response, url: str) -> str | None:
    if response.status_code in REDIRECT_CODES and response.headers.get("Location"):
        return urljoin(url, response.headers["Location"])
    return None


class TruncatedBodyError(requests.exceptions.ChunkedEncodingError):
    """The connection closed before the body declared by Content-Length was complete (retryable)."""


def _declared_length(response: requests.Response) -> int | None:
    """Content-Length of an unencoded body (None if absent, malformed or content-encoded, e.g. gzip)."""
    if response.headers.get("Content-Encoding", "identity").strip().lower() not in ("", "identity"):
        return None
    try:
        length = int(response.headers.get("Content-Length", ""))
    except ValueError:
        return None
    return length if length >= 0 else None


class DownloadDeadlineError(requests.exceptions.Timeout):
    """A download took longer than sources.download_timeout_s in all (a server trickling bytes); not retried."""


def _remaining(deadline: float, what: str) -> float:
    """Seconds left before deadline; DownloadDeadlineError when none are."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise DownloadDeadlineError(f"{what}: the download deadline (sources.download_timeout_s) passed")
    return left


def _body_chunks(response: requests.Response, deadline: float) -> Iterator[bytes]:
    """The body as it arrives (each read returns what one receive brings), checking the deadline between reads."""
    while True:
        _remaining(deadline, "reading the body")
        try:
            chunk = response.raw.read1(1 << 16, decode_content=True)
        except urllib3.exceptions.ReadTimeoutError as error:
            raise requests.exceptions.ReadTimeout(str(error)) from None
        except (urllib3.exceptions.ProtocolError, urllib3.exceptions.DecodeError) as error:
            raise requests.exceptions.ChunkedEncodingError(str(error)) from None
        if not chunk:
            return
        yield chunk


def _read_body(response: requests.Response, deadline: float = math.inf) -> bytes:
    """The whole body before deadline, refusing more than MAX_DOWNLOAD_BYTES (a declared Content-Length over it
    before reading anything); TruncatedBodyError if shorter than Content-Length."""
    declared = _declared_length(response)
    if declared is not None and declared > MAX_DOWNLOAD_BYTES:
        raise ValueError(f"declared Content-Length {declared} is over the {MAX_DOWNLOAD_BYTES}-byte limit")
    chunks, total = [], 0
    try:
        for chunk in _body_chunks(response, deadline):
            total += len(chunk)
            if total > MAX_DOWNLOAD_BYTES:
                raise ValueError(f"response larger than {MAX_DOWNLOAD_BYTES} bytes")
            chunks.append(chunk)
    except requests.exceptions.ChunkedEncodingError as error:
        if declared is not None and INCOMPLETE_READ.search(str(error)):  # urllib3 noticed the short body first
            raise TruncatedBodyError(f"truncated body: got {total} of {declared} bytes") from None
        raise
    if declared is not None and total < declared:
        raise TruncatedBodyError(f"truncated body: got {total} of {declared} bytes")
    return b"".join(chunks)


def _timeouts(sources: SourcesConfig, deadline: float) -> tuple[float, float]:
    """(connect, read) timeouts of one request: request_timeout_s, never past the download's deadline."""
    left = _remaining(deadline, "before the request")
    return min(sources.request_timeout_s, left), min(sources.request_timeout_s, left)


def _get_once(
    session: requests.Session, url: str, sources: SourcesConfig, deadline: float = math.inf
) -> tuple[int, bytes]:
    """One GET following redirects by hand; the session's PinnedAdapter checks each hop and connects to the address
    that passed the check. (status, body)."""
    for _ in range(MAX_REDIRECTS + 1):
        timeout = _timeouts(sources, deadline)
        with session.get(url, timeout=timeout, allow_redirects=False, stream=True) as response:
            target = _redirect_target(response, url)
            if target is None:
                body = _read_body(response, deadline) if 200 <= response.status_code < 300 else b""
                return response.status_code, body
        url = target
    raise ValueError(f"more than {MAX_REDIRECTS} redirects")


def fetch_bytes(session: requests.Session, url: str, sources: SourcesConfig) -> tuple[bytes | None, str]:
    """GET url with retries (connection errors, timeouts, truncated bodies, 5xx, 429; backoff 0.2s*2**i), all
    within sources.download_timeout_s; every hop checked and pinned (the session gets a PinnedAdapter).

    The deadline covers connecting, the status line, the headers and the body of every attempt: a watchdog shuts
    the connection down when it passes (acquire/deadline.py), however slowly the server trickles its bytes.
    Returns (bytes, "") or (None, error); a body shorter than its Content-Length is never returned.
    """
    pin_session(session, sources.allow_private_addresses)
    with download_deadline(sources.download_timeout_s) as watchdog:
        return _fetch_with_retries(session, url, sources, watchdog)


def _fetch_with_retries(
    session: requests.Session, url: str, sources: SourcesConfig, watchdog: Watchdog
) -> tuple[bytes | None, str]:
    late = f"took longer than {sources.download_timeout_s:g} s in all"
    error = ""
    for attempt in range(sources.max_retries + 1):
        if attempt and watchdog.wait(BACKOFF_BASE_S * 2 ** (attempt - 1)):
            return None, f"{late} (before attempt {attempt + 1}; last error: {error})"
        try:
            status, body = _get_once(session, url, sources, watchdog.deadline)
        except UnsafeUrlError as unsafe:
            return None, str(unsafe)
        except DownloadDeadlineError as failure:
            return None, f"{late} ({failure})"
        except TruncatedBodyError as failure:
            error = str(failure)
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as failure:
            error = f"{type(failure).__name__}: {failure}"
        except (requests.RequestException, ValueError) as failure:
            error = f"{type(failure).__name__}: {failure}"
            return (None, f"{late} (cut off: {error})") if watchdog.fired else (None, error)
        else:
            if watchdog.fired:  # whatever was read, the watchdog cut it short
                return None, f"{late} (cut off after http {status})"
            if 200 <= status < 300:
                return body, ""
            error = f"http {status}"
            if status != 429 and status < 500:
                return None, error
        if watchdog.fired:
            return None, f"{late} (the connection was shut down at the deadline: {error})"
    return None, error[:500]
