"""The Prefect API a flow run talks to: the one PREFECT_API_URL names, or a temporary server started here.

Prefect starts its temporary (ephemeral) server lazily, inside the first flow call, with a 20 s limit; a busy
2-core machine needs longer. Starting it here first, with a longer limit and one retry, makes a slow start a clear
one-line error (PrefectStartError) instead of a traceback from deep inside a flow. Every way aidetect gets its
Prefect API goes through prefect_session(), which first looks for a server kept up by `aidetect server start`
(flows/server.py).

The temporary server is the process Prefect's own SubprocessASGIServer runs (the same uvicorn command and settings:
no UI, ephemeral mode, the database in PREFECT_HOME), started here without importing Prefect's server code into
this process (seconds of FastAPI, SQLAlchemy and route modules that only the server needs): the flows reach it
through PREFECT_API_URL, set for the session, as they reach a kept-up one. While it starts, this process does the
work the caller hands over (`prepare`: importing the flows), so the two share the machine's cores instead of
waiting on each other. It stops with the session, and with this process however it ends (flows/lifeline.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from pipeline_lib.core import privacy

log = logging.getLogger(__name__)

STARTUP_LIMIT_S = 120  # seconds for the temporary server to answer, unless the user set Prefect's own limit
STARTUP_ATTEMPTS = 2  # one retry: a second try on a fresh port after a timed-out start
STOP_WAIT_S = 5.0  # after SIGTERM, how long the server gets before SIGKILL (as Prefect's own stop)
POLL_S = 0.1
DRAIN_S = 30.0  # how long the logs and events still queued for the API may take to send before the server stops
PORT_TAKEN = 3  # uvicorn's exit status when its port was taken meanwhile: start again on another port
# What Prefect's SubprocessASGIServer sets for its server process: no UI, the ephemeral server's settings.
SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}


class PrefectStartError(RuntimeError):
    """No Prefect API to run flows on; the message is one line that says what happened and what to try."""


def startup_limit() -> int:
    """Prefect's PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS when the user set it, else STARTUP_LIMIT_S."""
    from prefect.settings import get_current_settings

    ephemeral = get_current_settings().server.ephemeral
    if "startup_timeout_seconds" in ephemeral.model_fields_set:
        return int(ephemeral.startup_timeout_seconds)
    return STARTUP_LIMIT_S


@contextlib.contextmanager
def prefect_session(
    limit_s: int | None = None, attempts: int = STARTUP_ATTEMPTS, prepare: Callable[[], Any] | None = None
) -> Iterator[str]:
    """The Prefect API for a command's flows: PREFECT_API_URL if set, else the server `aidetect server start` keeps
    up, else a temporary server started now (PrefectStartError if it does not answer), set for the block.

    prepare (e.g. importing the flows) runs once before the block, while a temporary server starts.
    """
    from flows.server import prefect_api as kept_up

    with kept_up() as api:
        if api:
            if prepare is not None:
                prepare()
            yield api
            return
        privacy.quiet_prefect_server()  # the server process reads it; a Prefect profile's own choice still wins
        with temporary_server(startup_limit() if limit_s is None else limit_s, attempts, prepare) as url:
            yield url


@dataclass
class TemporaryServer:
    """A temporary Prefect server process listening on a loopback port."""

    port: int
    process: subprocess.Popen[bytes]

    @property
    def api_url(self) -> str:
        """Its API URL."""
        return f"http://127.0.0.1:{self.port}/api"

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after STOP_WAIT_S; reaped either way (nothing if it has ended)."""
        if self.process.poll() is not None:
            return
        log.info("stopping the temporary Prefect server on %s", self.api_url)
        self.process.terminate()
        try:
            self.process.wait(timeout=STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@contextlib.contextmanager
def temporary_server(
    limit_s: int, attempts: int = STARTUP_ATTEMPTS, prepare: Callable[[], Any] | None = None
) -> Iterator[str]:
    """A temporary server for the block, its API URL set as PREFECT_API_URL (for child processes too).

    prepare runs while the first try starts. PrefectStartError when no try answers within limit_s.
    """
    from flows.server import using_api

    server = launch_server()
    try:
        if prepare is not None:
            prepare()
        server = wait_for_server(server, limit_s, attempts)
        with using_api(server.api_url):
            try:
                yield server.api_url
            finally:
                send_queued_to_api()
    finally:
        server.stop()


def send_queued_to_api() -> None:
    """Send what Prefect still queues for its API (log records, the events that carry task runs' states) before
    the server stops, as Prefect's own test harness does; waits DRAIN_S at most for each."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=DRAIN_S)


def launch_server(port: int | None = None) -> TemporaryServer:
    """Start the server process on port (default: a free one), tied to this process's life; no waiting."""
    import prefect
    from prefect.settings import get_current_settings

    from flows.lifeline import tie_to_this_process

    port = port or free_port()
    command = [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent)]
    command += ["--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--log-level", "error", "--lifespan", "on"]
    settings = get_current_settings().to_environment_variables(exclude_unset=True)  # temporary settings included
    process = subprocess.Popen(command, env=os.environ | SERVER_ENV | settings)
    tie_to_this_process(process.pid)  # stops with this process, even one killed with SIGKILL
    log.info("starting a temporary Prefect server on http://127.0.0.1:%d", port)
    return TemporaryServer(port, process)


def wait_for_server(server: TemporaryServer, limit_s: int, attempts: int = STARTUP_ATTEMPTS) -> TemporaryServer:
    """The server once it answers, or a fresh one that does (attempts tries of limit_s each, 0: no wait).

    Raises PrefectStartError naming why the last try failed.
    """
    reason = ""
    for attempt in range(1, attempts + 1):
        if attempt > 1:
            server = launch_server()
        server, reason = _answering(server, limit_s)
        if not reason:
            return server
        log.warning("temporary Prefect server, try %d of %d: %s", attempt, attempts, reason)
        server.stop()
    raise PrefectStartError(
        f"Prefect's temporary server did not start within {limit_s} s ({attempts} tries; {reason}). The machine may "
        "be busy: try again, raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, or keep a server running with "
        "`aidetect server start` (or `prefect server start` and PREFECT_API_URL=http://127.0.0.1:4200/api)"
    )


def _answering(server: TemporaryServer, limit_s: float) -> tuple[TemporaryServer, str]:
    """(the server, "") once its health check answers within limit_s; (the server, why not) otherwise. A server
    whose port was taken before it bound starts again on another port within the same limit."""
    from flows.server import is_up

    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        code = server.process.poll()
        if code == PORT_TAKEN:
            server = launch_server()
            continue
        if code is not None:
            return server, f"the server exited with code {code}"
        if is_up(server.api_url):
            return server, ""
        time.sleep(POLL_S)
    return server, f"no answer from {server.api_url}"


def free_port() -> int:
    """A loopback port free now (the server may still lose it to another process: see PORT_TAKEN)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
