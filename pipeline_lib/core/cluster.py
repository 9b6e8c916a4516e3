"""A remote Dask cluster runs the per-image stages only if every worker sees the workspace at the same path: check it.

The mapped per-image tasks pass paths relative to the workspace root (never image bytes), so a worker reads originals
from, and writes tensors into, the workspace itself. A worker that sees another folder at that path (its own disk
instead of the shared one) or none at all would fail every chunk, or worse, fill a folder nobody reads. This module
asks every worker, before the first stage, to read a token the run wrote and to write an answer the run reads back.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import socket
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TIMEOUT_S = 60.0  # to reach the scheduler, for a first worker to join, for the workers to answer
CHECK_FOLDER_PREFIX = ".cluster-check-"
SHARING_HELP = (
    "Every Dask worker must see the workspace at this same path, read-write (e.g. one NFS export mounted at that path "
    "on every machine; see 'What the workers must see' in docs/team.md)"
)


class ClusterError(RuntimeError):
    """The Dask cluster cannot run this workspace's per-image stages; the message says which worker and why."""


def probe_workspace(folder: str, token: str) -> dict[str, str]:
    """On a worker: read the token the run wrote into folder, write an answer file next to it.

    Returns {"error": why not} or {"answer": the answer file's name, "host": this machine}.
    """
    try:
        seen = (Path(folder) / "token").read_text(encoding="utf-8")
    except OSError as error:
        return {"error": f"cannot read {folder}/token: {error.strerror or error}"}
    if seen != token:
        return {"error": f"{folder}/token holds another token: this worker sees a different folder at that path"}
    name = f"answer-{socket.gethostname()}-{os.getpid()}"
    try:
        (Path(folder) / name).write_text(token, encoding="utf-8")
    except OSError as error:
        return {"error": f"cannot write into {folder}: {error.strerror or error}"}
    return {"answer": name, "host": socket.gethostname()}


def check_workers_see(address: str, root: Path, timeout_s: float = TIMEOUT_S) -> int:
    """Raise ClusterError unless the scheduler at address answers and each of its workers reads and writes root.

    Returns how many workers were checked. Workers that join later are not checked.
    """
    folder = Path(root) / f"{CHECK_FOLDER_PREFIX}{secrets.token_hex(8)}"
    folder.mkdir(parents=True)
    token = secrets.token_hex(16)
    (folder / "token").write_text(token, encoding="utf-8")
    try:
        answers = _ask_workers(address, str(folder), token, timeout_s)
        problems = _problems(answers, folder, token)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if problems:
        raise ClusterError(
            f"{len(problems)} of {len(answers)} Dask worker(s) of {address} cannot use the workspace {root}: "
            + "; ".join(f"{worker}: {why}" for worker, why in sorted(problems.items()))
            + f". {SHARING_HELP}"
        )
    log.info("all %d Dask worker(s) of %s see the workspace %s", len(answers), address, root)
    return len(answers)


def _ask_workers(address: str, folder: str, token: str, timeout_s: float) -> dict[str, Any]:
    """Each worker's probe_workspace result (or the exception it raised), by worker address."""
    from distributed import Client

    try:
        client = Client(address, timeout=timeout_s, set_as_default=False)
    except (OSError, TimeoutError) as error:
        raise ClusterError(
            f"no Dask scheduler answers at {address} (execution.dask_address) within {timeout_s:.0f} s: {error}. "
            "Start one with `dask scheduler` (docs/team.md) or fix the address."
        ) from None
    with client:
        try:
            client.wait_for_workers(1, timeout=timeout_s)
        except TimeoutError:
            raise ClusterError(
                f"the Dask scheduler at {address} has no worker after {timeout_s:.0f} s: "
                f"start `dask worker {address}` on machines that see the workspace"
            ) from None
        try:
            return client.run(probe_workspace, folder, token, on_error="return", callback_timeout=timeout_s)
        except TimeoutError:
            raise ClusterError(
                f"the Dask workers of {address} did not answer within {timeout_s:.0f} s whether they see {folder} "
                "(a hung network mount?)"
            ) from None


def _problems(answers: dict[str, Any], folder: Path, token: str) -> dict[str, str]:
    """What is wrong, by worker: an error it reported or raised, or an answer this process cannot read back."""
    problems = {}
    for worker, answer in answers.items():
        if isinstance(answer, BaseException):
            problems[worker] = f"{type(answer).__name__}: {answer} (is aidetect installed on that worker?)"
        elif "error" in answer:
            problems[worker] = answer["error"]
        elif not _reads_back(folder / answer["answer"], token):
            problems[worker] = f"wrote {answer['answer']} on {answer['host']}, but this machine does not see it"
    return problems


def _reads_back(path: Path, token: str) -> bool:
    """True if path holds token (a worker's write is visible here)."""
    try:
        return path.read_text(encoding="utf-8") == token
    except OSError:
        return False

