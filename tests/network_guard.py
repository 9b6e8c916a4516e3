"""A guard that fails any connection to an address outside loopback, in this process and in every Python child.

In process: `no_remote_connections()` installs an audit hook (socket.connect, socket.getaddrinfo, socket.sendto)
that raises PermissionError for a non-loopback address while the block runs. For child processes:
`guarded_environment()` puts a sitecustomize.py on PYTHONPATH that installs the same hook at interpreter start in
every Python process started with that environment (and their children: they inherit it), records each violation
in a file, and records every subprocess each process starts with the telemetry settings of its environment.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

LOG_ENV = "AIDETECT_NETWORK_GUARD_LOG"
CI_MARKERS = ("PYTEST_CURRENT_TEST", "CI", "GITHUB_ACTIONS", "GITLAB_CI")  # MLflow turns telemetry off for these
TELEMETRY_ENV = ("MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK", "PREFECT_SERVER_ANALYTICS_ENABLED")

HOOK = r'''
import ipaddress, json, os, sys

def _loopback(host):
    if host in (None, "", b"", "localhost", b"localhost"):
        return True
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return str(host).endswith(".localhost")

def _write(entry):
    path = os.environ.get("AIDETECT_NETWORK_GUARD_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry) + "\n")

def _remote(event, args):
    if event == "socket.getaddrinfo":
        return None if _loopback(args[0]) else str(args[0])
    if event in ("socket.connect", "socket.sendto"):
        address = args[1]
        if isinstance(address, tuple) and address and not _loopback(address[0]):
            return f"{address[0]}:{address[1] if len(address) > 1 else ''}"
    return None

def _hook(event, args):
    if event == "subprocess.Popen":
        env = args[3] if args[3] is not None else os.environ
        keys = ("MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK", "PREFECT_SERVER_ANALYTICS_ENABLED")
        _write({"kind": "spawn", "pid": os.getpid(), "args": [str(a) for a in (args[1] or [])][:6],
                "telemetry": {key: env.get(key) for key in keys}})
        return
    target = _remote(event, args)
    if target is not None:
        _write({"kind": "remote", "pid": os.getpid(), "event": event, "target": target, "argv": sys.argv[:3]})
        raise PermissionError(f"network guard: {event} to {target} (only loopback is allowed)")

sys.addaudithook(_hook)
'''


def guarded_environment(folder: Path, base: dict[str, str] | None = None) -> tuple[dict[str, str], Path]:
    """(environment for a child process with the guard installed and no CI/pytest markers, its log file)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(HOOK, encoding="utf-8")
    log = folder / "guard.jsonl"
    log.write_text("", encoding="utf-8")
    env = {k: v for k, v in (base if base is not None else os.environ).items() if k not in CI_MARKERS}
    env = {k: v for k, v in env.items() if k not in TELEMETRY_ENV and not k.startswith("PREFECT_")}
    env["PYTHONPATH"] = os.pathsep.join([str(folder), *filter(None, [env.get("PYTHONPATH")])])
    env[LOG_ENV] = str(log)
    return env, log


def read_log(log: Path) -> list[dict[str, Any]]:
    """The guard's entries: remote connections tried (kind remote) and subprocesses started (kind spawn)."""
    return [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]


_SEEN: list[str] = []
_ACTIVE: list[bool] = []


def _in_process_hook(event: str, args: tuple[Any, ...]) -> None:
    if not _ACTIVE:
        return
    target = None
    if event == "socket.getaddrinfo" and not _is_loopback(args[0]):
        target = str(args[0])
    elif event in ("socket.connect", "socket.sendto"):
        address = args[1]
        if isinstance(address, tuple) and address and not _is_loopback(address[0]):
            target = str(address[0])
    if target is not None:
        _SEEN.append(f"{event} {target}")
        raise PermissionError(f"network guard: {event} to {target} (only loopback is allowed)")


def _is_loopback(host: Any) -> bool:
    if host in (None, "", b"", "localhost", b"localhost"):
        return True
    text = host.decode("ascii", "replace") if isinstance(host, bytes) else str(host)
    try:
        return ipaddress.ip_address(text.split("%")[0]).is_loopback
    except ValueError:
        return text.endswith(".localhost")


_INSTALLED: list[bool] = []


@contextlib.contextmanager
def no_remote_connections() -> Iterator[list[str]]:
    """Within the block, any connection to a non-loopback address raises; yields the list of attempts."""
    if not _INSTALLED:
        sys.addaudithook(_in_process_hook)  # audit hooks cannot be removed: this one is idle outside the block
        _INSTALLED.append(True)
    _SEEN.clear()
    _ACTIVE.append(True)
    try:
        yield _SEEN
    finally:
        _ACTIVE.pop()
