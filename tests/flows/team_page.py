"""docs/team.md as a script: its `bash team:NAME` code blocks, run in order in one bash session as a user would paste
them into one terminal, with the test's own ports and folders in the settings block."""

from __future__ import annotations

import contextlib
import os
import queue
import re
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "team.md"
BLOCK = re.compile(r"^```bash team:(\S+)\n(.*?)^```", re.DOTALL | re.MULTILINE)
EXPORT = re.compile(r"^export (\w+)=")
DONE = "__team_page_block_done__"


def read_blocks(page: Path = PAGE) -> dict[str, str]:
    """The page's marked blocks by name, in page order."""
    found = BLOCK.findall(page.read_text(encoding="utf-8"))
    names = [name for name, _ in found]
    assert len(set(names)) == len(names), f"{page}: a block name appears twice: {names}"
    return dict(found)


def exported_names(block: str) -> list[str]:
    """The variables a block exports (`export NAME=...` lines), in order."""
    return [match.group(1) for line in block.splitlines() if (match := EXPORT.match(line))]


def with_values(block: str, values: Mapping[str, str]) -> str:
    """The block with each `export NAME=...` line of a name in values set to that value instead."""
    lines = []
    for line in block.splitlines():
        match = EXPORT.match(line)
        if match and match.group(1) in values:
            line = f"export {match.group(1)}={shlex.quote(values[match.group(1)])}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def replace_once(block: str, old: str, new: str) -> str:
    """block with old replaced by new; old must occur exactly once (else the page changed: the test must follow)."""
    assert block.count(old) == 1, f"expected {old!r} once in the block:\n{block}"
    return block.replace(old, new)


class Session:
    """One bash reading the blocks from a pipe (not its stdin, which is /dev/null: the background jobs it starts with
    job control on inherit stdin), stopping at the first failing command (set -e), so that variables, the working
    folder and background jobs carry from block to block, as in a terminal; run() returns a block's output."""

    def __init__(self, env: Mapping[str, str], cwd: Path) -> None:
        read_end, self._commands = os.pipe()
        self.process = subprocess.Popen(
            ["bash", "--noprofile", "--norc", "-e", "-o", "pipefail", f"/dev/fd/{read_end}"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            pass_fds=(read_end,),
            env=dict(env),
            cwd=cwd,
            text=True,
            start_new_session=True,
        )
        os.close(read_end)
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def run(self, name: str, script: str, seconds: float) -> str:
        """Run one block; its output. AssertionError with the output so far if it fails or takes over seconds."""
        os.write(self._commands, f"{script}\nprintf '\\n%s\\n' {DONE}\n".encode())
        lines: list[str] = []
        while True:
            try:
                line = self._lines.get(timeout=seconds)
            except queue.Empty:
                raise AssertionError(f"block {name} did not end in {seconds:.0f} s:\n{''.join(lines)}") from None
            if line is None:
                self.process.wait()
                raise AssertionError(f"block {name} failed (exit {self.process.returncode}):\n{''.join(lines)}")
            if line.strip() == DONE:
                return "".join(lines)
            lines.append(line)

    def close(self) -> None:
        """End the session (its background jobs are stopped by the caller)."""
        with contextlib.suppress(OSError):
            os.close(self._commands)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)


def _live_groups() -> set[int]:
    """The process groups that have a process other than a zombie (from /proc: a zombie is gone, only not yet
    reaped)."""
    groups = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, pgrp, ...
            if fields[0] != "Z":
                groups.add(int(fields[2]))
    return groups


def alive_groups(pids: Mapping[str, int]) -> list[str]:
    """The names whose process group (the background job's leader and the children it started) still runs."""
    live = _live_groups()
    return [name for name, pid in pids.items() if pid in live]


def stop_groups(pids: Mapping[str, int], seconds: float = 60) -> None:
    """Last resort after a failure: SIGTERM to every group left, SIGKILL to those still there after seconds."""
    deadline = time.monotonic() + seconds
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for name in alive_groups(pids):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pids[name], sig)
        while sig == signal.SIGTERM and alive_groups(pids) and time.monotonic() < deadline:
            time.sleep(0.5)


@contextlib.contextmanager
def session(env: Mapping[str, str], cwd: Path) -> Iterator[Session]:
    """A Session, closed at the end."""
    shell = Session(env, cwd)
    try:
        yield shell
    finally:
        shell.close()
