"""A lock between the test processes of one checkout (pytest-xdist workers, or two pytest runs): a test that edits
the checkout's own files (the cache matrix: a line of dedup.py, the report template) does so while no other test
runs, since any other test may read them (a stage's cache key holds the code it reaches).

A readers-writer lock on two files in the system's temporary folder, named by the checkout: every test reads (the
conftest holds `reading()` around each test, unless the test is marked `edits_checkout`); an edit is made inside
`editing()`, which waits for the tests running elsewhere to end and keeps new ones waiting (writer first).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]
_NAME = f"aidetect-tests-{hashlib.sha256(str(CHECKOUT).encode()).hexdigest()[:16]}"
_held = {"reading": 0}  # this process's reading() depth: editing() inside it would wait for itself


def _lock_path(kind: str) -> Path:
    return Path(tempfile.gettempdir()) / f"{_NAME}.{kind}.lock"


@contextlib.contextmanager
def _flock(kind: str, operation: int) -> Iterator[None]:
    with _lock_path(kind).open("a") as handle:  # a file of its own per holder: flock counts open files, not processes
        fcntl.flock(handle, operation)
        yield  # closing the file lets go


@contextlib.contextmanager
def reading() -> Iterator[None]:
    """Held while a test runs: waits while an edit is made or waits to be made."""
    with _flock("turnstile", fcntl.LOCK_SH):  # a writer waiting holds the turnstile: no new reader passes
        stack = contextlib.ExitStack()
        stack.enter_context(_flock("checkout", fcntl.LOCK_SH))
    _held["reading"] += 1
    try:
        with stack:
            yield
    finally:
        _held["reading"] -= 1


@contextlib.contextmanager
def editing() -> Iterator[None]:
    """Held while the checkout's files are edited: once the tests running in other processes have ended."""
    if _held["reading"]:
        raise RuntimeError("a test that edits the checkout must be marked @pytest.mark.edits_checkout")
    with _flock("turnstile", fcntl.LOCK_EX), _flock("checkout", fcntl.LOCK_EX):
        yield
