"""One total deadline per download: a watchdog timer shuts the download's connections down when its time is up.

A socket timeout bounds each single read, so a server sending its status line, headers or body one byte at a time
never trips it. Instead, while download_deadline() is active in a thread, every connection that thread reads a
response from (the PinnedAdapter's pools make WatchedHTTP(S)Connection) is registered with the deadline's
watchdog; when the deadline passes, the watchdog shuts those sockets down, so the blocked read returns at once,
wherever it is. The timer waits on its own event: nothing polls. Connecting, the TLS handshake and sending the
request are bounded by the connect timeout, which fetch sets to what is left of the deadline at most (CPython
bounds a whole handshake and a whole sendall by the socket's timeout); the name was resolved before, by the URL check.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool


class Watchdog:
    """Shuts down every socket registered with it once `seconds` have passed (unless stopped first)."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []  # duplicates of the registered sockets: ours to shut and close
        self._fired = threading.Event()
        self._stopped = False
        self._timer = threading.Timer(max(0.0, seconds), self._fire)
        self._timer.daemon = True

    @property
    def fired(self) -> bool:
        """Whether the deadline passed while the watchdog ran."""
        return self._fired.is_set()

    def remaining(self) -> float:
        """Seconds left before the deadline (0 once it passed)."""
        return max(0.0, self.deadline - time.monotonic())

    def wait(self, seconds: float) -> bool:
        """Wait up to seconds; True (at once) when the watchdog has fired or fires meanwhile."""
        return self._fired.wait(seconds)

    def watch(self, sock: socket.socket | None) -> None:
        """Register a socket the download uses (shut down at once if the deadline has passed).

        The watchdog keeps a duplicate descriptor of it: shutting that down ends reads on every descriptor of the
        socket (a TLS layer's too), and it stays valid however the connection's own descriptor is closed or reused.
        """
        if sock is None or sock.fileno() < 0:
            return
        copy = socket.socket(sock.family, sock.type, sock.proto, fileno=os.dup(sock.fileno()))
        with self._lock:
            if self._stopped:
                copy.close()
                return
            if not self.fired:
                self._sockets.append(copy)
                return
        _shut(copy)

    def start(self) -> None:
        """Start the timer."""
        self._timer.start()

    def stop(self) -> None:
        """Stop watching: the timer is cancelled and no socket is shut down any more."""
        with self._lock:
            self._stopped = True
            sockets, self._sockets = self._sockets, []
        self._timer.cancel()
        for copy in sockets:
            copy.close()

    def _fire(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self._fired.set()
            sockets, self._sockets = self._sockets, []
        for copy in sockets:
            _shut(copy)


def _shut(copy: socket.socket) -> None:
    """Shut a duplicate down for reading and writing (a read blocked on the socket in another thread returns), then
    close the duplicate (the connection's own descriptor stays open: its thread closes it)."""
    with contextlib.suppress(OSError):
        copy.shutdown(socket.SHUT_RDWR)
    copy.close()


_CURRENT: contextvars.ContextVar[Watchdog | None] = contextvars.ContextVar("download_watchdog", default=None)


@contextlib.contextmanager
def download_deadline(seconds: float) -> Iterator[Watchdog]:
    """Within the block, this thread's responses are read under one watchdog of `seconds` in all."""
    watchdog = Watchdog(seconds)
    token = _CURRENT.set(watchdog)
    watchdog.start()
    try:
        yield watchdog
    finally:
        watchdog.stop()
        _CURRENT.reset(token)


def _watch_current(sock: socket.socket | None) -> None:
    watchdog = _CURRENT.get()
    if watchdog is not None:
        watchdog.watch(sock)


class _Watched:
    """Registers a connection's socket with the current download's watchdog before a response is read from it."""

    sock: socket.socket | None

    def getresponse(self) -> Any:
        """urllib3's getresponse, under the current watchdog."""
        _watch_current(self.sock)
        return super().getresponse()  # type: ignore[misc]


class WatchedHTTPConnection(_Watched, HTTPConnection):
    """An HTTP connection a download's deadline reaches."""


class WatchedHTTPSConnection(_Watched, HTTPSConnection):
    """An HTTPS connection a download's deadline reaches."""


class WatchedHTTPConnectionPool(HTTPConnectionPool):
    """A pool of WatchedHTTPConnection."""

    ConnectionCls = WatchedHTTPConnection


class WatchedHTTPSConnectionPool(HTTPSConnectionPool):
    """A pool of WatchedHTTPSConnection."""

    ConnectionCls = WatchedHTTPSConnection


WATCHED_POOLS: dict[str, type[HTTPConnectionPool]] = {
    "http": WatchedHTTPConnectionPool,
    "https": WatchedHTTPSConnectionPool,
}
