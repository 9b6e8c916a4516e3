"""A Prefect server that stays up between `aidetect` calls, and the Prefect API each call uses.

Without PREFECT_API_URL, every flow run starts Prefect's temporary server inside its own process and stops it at
the end: seconds of fixed cost for every command, and no UI. `aidetect server start` runs `prefect server start`
(analytics off) in the background, in its own session, logging to PREFECT_HOME/aidetect-server.log, and records
its URL in PREFECT_HOME/aidetect-server.json. A later command without PREFECT_API_URL uses that server while it
answers (`prefect_api`); PREFECT_API_URL, when set, always wins.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

RECORD_FILE = "aidetect-server.json"
LOG_FILE = "aidetect-server.log"
HEALTH_TIMEOUT_S = 2.0
POLL_S = 0.25


class ServerError(RuntimeError):
    """The background Prefect server could not be started or stopped."""


@dataclass(frozen=True)
class ServerRecord:
    """The background server started by `aidetect server start`."""

    api_url: str
    pid: int


def prefect_home() -> Path:
    """Prefect's home folder (PREFECT_HOME, with profiles and temporary settings applied)."""
    from prefect.settings import PREFECT_HOME

    return Path(PREFECT_HOME.value()).expanduser()


def record_path(home: Path) -> Path:
    """Where the record of the background server lives."""
    return home / RECORD_FILE


def read_record(home: Path) -> ServerRecord | None:
    """The recorded background server, or None (no record, or an unreadable one)."""
    path = record_path(home)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return ServerRecord(str(data["api_url"]), int(data["pid"]))
    except (ValueError, KeyError, TypeError) as error:
        log.warning("ignoring unreadable %s: %s", path, error)
        return None


def is_up(api_url: str, timeout_s: float = HEALTH_TIMEOUT_S) -> bool:
    """Whether a Prefect API answers its health check at api_url."""
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout_s) as response:
            return response.status == 200
    except OSError:
        return False


def running_server(home: Path) -> ServerRecord | None:
    """The recorded background server if it answers, else None."""
    record = read_record(home)
    return record if record is not None and is_up(record.api_url) else None


def _wait_until_up(process: subprocess.Popen[bytes], api_url: str, timeout_s: float, log_path: Path) -> None:
    """Return once api_url answers; ServerError (with the log's end) if the server exits or the time runs out."""
    deadline = time.monotonic() + timeout_s
    while not is_up(api_url):
        if process.poll() is not None or time.monotonic() > deadline:
            if process.poll() is None:
                _terminate(process.pid)
            tail = log_path.read_text(encoding="utf-8", errors="replace")[-2000:]
            why = f"exited with code {process.returncode}" if process.returncode is not None else "did not answer"
            raise ServerError(f"the Prefect server at {api_url} {why} within {timeout_s:.0f} s; {log_path}:\n{tail}")
        time.sleep(POLL_S)


def start_server(home: Path, host: str, port: int, timeout_s: float) -> tuple[ServerRecord, bool]:
    """Start `prefect server start` in the background unless the recorded one answers; (record, started now)."""
    found = running_server(home)
    if found is not None:
        return found, False
    home.mkdir(parents=True, exist_ok=True)
    shown = f"[{host}]" if ":" in host else host
    api_url = f"http://{shown}:{port}/api"
    if is_up(api_url):
        raise ServerError(
            f"a Prefect server that `aidetect server start` did not start already answers at {api_url}: use it with "
            f"PREFECT_API_URL={api_url}, or pass another --port"
        )
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)]
    command.append("--analytics-off")
    log_path = home / LOG_FILE
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(  # its own session: it outlives this command and the terminal's Ctrl-C
            command,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=os.environ | {"PREFECT_HOME": str(home)},
            start_new_session=True,
        )
    _wait_until_up(process, api_url, timeout_s, log_path)
    record = ServerRecord(api_url, process.pid)
    record_path(home).write_text(json.dumps(asdict(record)), encoding="utf-8")
    return record, True


def _terminate(pid: int) -> None:
    """SIGTERM to the server's process group (its own session); nothing if it is gone."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def stop_server(home: Path, timeout_s: float = 60.0) -> ServerRecord | None:
    """Stop the recorded background server and remove its record; the record, or None if there was none."""
    record = read_record(home)
    if record is None:
        return None
    if not is_up(record.api_url):  # gone already (e.g. after a reboot): its pid may belong to another process now
        record_path(home).unlink(missing_ok=True)
        return record
    _terminate(record.pid)
    deadline = time.monotonic() + timeout_s
    while _alive(record.pid) and is_up(record.api_url):
        if time.monotonic() > deadline:
            raise ServerError(f"the Prefect server (pid {record.pid}) did not stop within {timeout_s:.0f} s")
        time.sleep(POLL_S)
    record_path(home).unlink(missing_ok=True)
    return record


@contextlib.contextmanager
def prefect_api() -> Iterator[str]:
    """The Prefect API for the block: PREFECT_API_URL if set, else the answering server of `aidetect server start`
    (set for the block, also in the environment of child processes), else "" (Prefect's temporary server)."""
    from prefect.settings import PREFECT_API_URL

    configured = PREFECT_API_URL.value()
    if configured:
        yield str(configured)
        return
    found = running_server(prefect_home())
    if found is None:
        yield ""
        return
    log.info("using the Prefect server started by `aidetect server start`: %s", found.api_url)
    with using_api(found.api_url):
        yield found.api_url


@contextlib.contextmanager
def using_api(api_url: str) -> Iterator[None]:
    """PREFECT_API_URL set to api_url for the block: in Prefect's settings and in the environment of child
    processes; both as they were afterwards."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    before = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = api_url
    try:
        with temporary_settings({PREFECT_API_URL: api_url}):
            yield
    finally:
        if before is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = before
