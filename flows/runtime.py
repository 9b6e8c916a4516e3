"""The Prefect API a flow run talks to: the one PREFECT_API_URL names, or a temporary server started here.

Prefect starts its temporary (ephemeral) server lazily, inside the first flow call, with a 20 s limit; a busy
2-core machine needs longer. Starting it here first, with a longer limit and one retry, makes a slow start a clear
one-line error (PrefectStartError) instead of a traceback from deep inside a flow; the flow then finds the server
running. Every way aidetect gets its Prefect API goes through prefect_session(), which first looks for a
server kept up by `aidetect server start` (flows/server.py).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from pipeline_lib.core import privacy

log = logging.getLogger(__name__)

STARTUP_LIMIT_S = 120  # seconds for the temporary server to answer, unless the user set Prefect's own limit
STARTUP_ATTEMPTS = 2  # one retry: a second try on a fresh port after a timed-out start


class PrefectStartError(RuntimeError):
    """No Prefect API to run flows on; the message is one line that says what happened and what to try."""


def startup_limit() -> int:
    """Prefect's PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS when the user set it, else STARTUP_LIMIT_S."""
    from prefect.settings import get_current_settings

    ephemeral = get_current_settings().server.ephemeral
    if "startup_timeout_seconds" in ephemeral.model_fields_set:
        return int(ephemeral.startup_timeout_seconds)
    return STARTUP_LIMIT_S


def prefect_api(limit_s: int | None = None, attempts: int = STARTUP_ATTEMPTS) -> str:
    """The Prefect API URL flows will use: PREFECT_API_URL if set, else a temporary server started now.

    Raises PrefectStartError when the temporary server does not answer within limit_s on any of the attempts.
    """
    from prefect.settings import PREFECT_API_URL

    configured = PREFECT_API_URL.value()
    if configured:
        return str(configured)
    privacy.quiet_prefect_server()  # the server process reads it; a Prefect profile's own choice still wins
    return start_temporary_server(startup_limit() if limit_s is None else limit_s, attempts)


@contextlib.contextmanager
def prefect_session(limit_s: int | None = None, attempts: int = STARTUP_ATTEMPTS) -> Iterator[str]:
    """The Prefect API for a command's flows: PREFECT_API_URL if set, else the server `aidetect server start` keeps
    up (flows.server, set for the block), else a temporary server started now (PrefectStartError if it does not)."""
    from flows.server import prefect_api as kept_up

    with kept_up() as api:
        yield api or prefect_api(limit_s, attempts)


def start_temporary_server(limit_s: int, attempts: int = STARTUP_ATTEMPTS) -> str:
    """Start Prefect's temporary server (the one its flows reuse in this process); its API URL."""
    from prefect.server.api.server import SubprocessASGIServer

    from flows.lifeline import tie_to_this_process

    reason = ""
    for attempt in range(1, attempts + 1):
        server = SubprocessASGIServer()  # the process-wide instance Prefect's own clients look up
        try:
            server.start(timeout=limit_s)  # 0 falls back to Prefect's setting (which a limit of 0 came from)
        except RuntimeError as error:
            reason = str(error).split(" stdout:")[0]
            log.warning("temporary Prefect server, try %d of %d: %s", attempt, attempts, reason)
            server.stop()  # ends its process and forgets it, so the next try starts afresh
            continue
        if server.server_process is not None:  # stops with this process, even one killed with SIGKILL
            tie_to_this_process(server.server_process.pid)
        return server.api_url
    raise PrefectStartError(
        f"Prefect's temporary server did not start within {limit_s} s ({attempts} tries; {reason}). The machine may "
        "be busy: try again, raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, or keep a server running with "
        "`prefect server start` and set PREFECT_API_URL=http://127.0.0.1:4200/api"
    )

