"""The temporary Prefect server lives only as long as the aidetect process that started it.

The temporary server is a child process (flows/runtime.py) stopped when the command's Prefect session ends. A
process killed with SIGKILL (or by the OOM killer) ends no session: the server is orphaned and keeps listening.
tie_to_this_process() starts a small watchdog that holds the read end of a pipe whose write end only this process
holds; the kernel closes it when this process dies, however it dies, and the watchdog then stops the server.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

log = logging.getLogger(__name__)

SERVER_MARK = "prefect.server.api.server:create_app"  # in the temporary server's command line

_WATCHDOG = """
import os, signal, sys, time
pid, mark = int(sys.argv[1]), sys.argv[2].encode()
while os.read(0, 1):  # b"" once every write end is closed: the aidetect process is gone
    pass
def alive():
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return mark in handle.read()  # still the server, not a new process that got its pid
    except OSError:
        return False
if alive():
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    if alive():
        os.kill(pid, signal.SIGKILL)
"""


def tie_to_this_process(pid: int, mark: str = SERVER_MARK) -> subprocess.Popen:
    """Start the watchdog that stops process pid (if its command line holds mark) when this process dies."""
    read_end, write_end = os.pipe()
    try:
        watchdog = subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG, str(pid), mark],
            stdin=read_end,
            stdout=subprocess.DEVNULL,
            start_new_session=True,  # not in this terminal's process group: Ctrl-C does not stop it early
        )
    finally:
        os.close(read_end)
    os.set_inheritable(write_end, False)  # only this process holds it (kept open for its lifetime)
    log.debug("watchdog %d stops pid %d when pid %d dies", watchdog.pid, pid, os.getpid())
    return watchdog

