"""tests/checkout_lock.py: an edit of the checkout waits for the tests that run, and new tests wait for the edit."""

from __future__ import annotations

import fcntl
import select
import subprocess
import sys
import time

import pytest

from tests import checkout_lock

EDITOR = "from tests import checkout_lock\nwith checkout_lock.editing():\n    print('editing', flush=True)\n"


def _turnstile_taken() -> bool:
    """Whether a writer holds the turnstile (so that no new reader gets in)."""
    with checkout_lock._lock_path("turnstile").open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        return False


@pytest.mark.edits_checkout  # this test takes the locks itself
def test_an_edit_waits_for_the_running_test_and_holds_new_ones_back() -> None:
    with checkout_lock.reading():
        editor = subprocess.Popen(
            [sys.executable, "-c", EDITOR], stdout=subprocess.PIPE, text=True, cwd=checkout_lock.CHECKOUT
        )
        try:
            deadline = time.monotonic() + 300
            while not _turnstile_taken():  # the editor is waiting for this reader, keeping new readers out
                assert editor.poll() is None, "the editor ended while a test held the lock"
                assert time.monotonic() < deadline, "the editor never asked for the lock"
                time.sleep(0.02)
            assert not select.select([editor.stdout], [], [], 0)[0], "the editor went on while a test held the lock"
        except BaseException:
            editor.kill()
            raise
    out, _ = editor.communicate(timeout=300)  # the reader let go: the edit is made
    assert editor.returncode == 0 and out == "editing\n", out
    with pytest.raises(RuntimeError, match="edits_checkout"), checkout_lock.reading(), checkout_lock.editing():
        pass
