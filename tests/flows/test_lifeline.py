"""The temporary Prefect server stops when the process that started it dies, even by SIGKILL."""

from __future__ import annotations

import signal
import subprocess
import sys

from flows.lifeline import SERVER_MARK

PARENT = """
import sys
from flows.lifeline import tie_to_this_process
tie_to_this_process(int(sys.argv[1]))
print("tied", flush=True)
sys.stdin.read()
"""


def test_a_tied_server_stops_when_its_starter_is_killed() -> None:
    # A stand-in for the server: a process whose command line carries the server's mark, sleeping "forever".
    server = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)", SERVER_MARK])
    unrelated = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)", "not-the-server"])
    try:
        parent = subprocess.Popen(
            [sys.executable, "-c", PARENT, str(server.pid)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert parent.stdout.readline().strip() == "tied"
        assert server.poll() is None, "the server runs while its starter lives"
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        assert server.wait(timeout=120) == -signal.SIGTERM, "the watchdog stops the server once its starter is gone"
        assert unrelated.poll() is None
    finally:
        for process in (server, unrelated):
            if process.poll() is None:
                process.kill()
                process.wait()


def test_the_watchdog_never_kills_a_process_that_is_not_the_server() -> None:
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)", "something-else"])
    try:
        parent = subprocess.Popen(
            [sys.executable, "-c", PARENT, str(other.pid)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert parent.stdout.readline().strip() == "tied"
        parent.stdin.close()  # the starter ends normally
        parent.wait()
        watchdogs = _watchdogs_of(other.pid)
        for watchdog in watchdogs:
            watchdog.wait(timeout=120)
        assert other.poll() is None, "a pid whose command line lacks the server's mark is left alone"
    finally:
        other.kill()
        other.wait()


def _watchdogs_of(pid: int) -> list:
    """The watchdog processes watching pid (found by their command line)."""
    import psutil

    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info.get("cmdline") or []
        if len(cmdline) >= 4 and cmdline[1] == "-c" and cmdline[3] == str(pid):
            found.append(process)
    return found
