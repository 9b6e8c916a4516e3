"""The download watchdog: a read blocked on a registered socket returns when the deadline passes; a stopped
watchdog touches nothing. Every wait here is on an event or a thread, with a limit far beyond the deadlines."""

from __future__ import annotations

import socket
import threading

from pipeline_lib.acquire.deadline import Watchdog, download_deadline

GENEROUS_S = 120.0  # how long a test waits for what a 0.05 s deadline should end at once


def _blocked_read(sock: socket.socket) -> tuple[threading.Thread, list[bytes]]:
    """A thread blocked reading sock (until data, EOF or GENEROUS_S); what it read goes into the list."""
    got: list[bytes] = []
    sock.settimeout(GENEROUS_S)
    thread = threading.Thread(target=lambda: got.append(sock.recv(1)), daemon=True)
    thread.start()
    return thread, got


def test_the_deadline_shuts_a_blocked_read_down() -> None:
    client, server = socket.socketpair()
    with client, server, download_deadline(0.05) as watchdog:
        watchdog.watch(client)
        thread, got = _blocked_read(client)
        assert watchdog.wait(GENEROUS_S), "the watchdog never fired"
        thread.join(GENEROUS_S)
        assert got == [b""], "the blocked read must end (EOF) when the deadline passes, not wait for the peer"
        late, peer = socket.socketpair()
        with late, peer:
            watchdog.watch(late)  # registered after the deadline: shut at once
            assert late.recv(1) == b""


def test_a_stopped_watchdog_leaves_its_sockets_alone() -> None:
    client, server = socket.socketpair()
    with client, server:
        with download_deadline(GENEROUS_S) as watchdog:
            watchdog.watch(client)
        assert not watchdog.fired
        server.sendall(b"x")
        client.settimeout(GENEROUS_S)
        assert client.recv(1) == b"x", "a download that ended in time keeps its pooled connection usable"
        watchdog.watch(client)  # after stop: ignored
        assert not watchdog.wait(0)


def test_zero_seconds_fires_at_once() -> None:
    watchdog = Watchdog(0)
    watchdog.start()
    assert watchdog.wait(GENEROUS_S) and watchdog.remaining() == 0
    watchdog.stop()
