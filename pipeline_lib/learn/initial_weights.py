"""The check that a run's initial weights are on disk, remembered in the workspace while the file is unchanged.

Before its first stage a run makes sure the weights train.weights names are there (learn.models.ensure_initial_weights:
ImageNet weights downloaded and hash-checked, a local file found), so that an offline machine fails before the crawl
rather than after the review. That check imports torch and torchvision (seconds) and reads the whole file (100 MB for
ResNet50), on every run, also on one whose model stages are all cached. Its answer is kept in
cache/initial-weights.json, by what was asked (model, weights, URL and the TORCH_HOME the file is looked up in), with
the file's (mtime, size): a later run that asks the same while the file is unchanged takes the answer; a file removed,
replaced or touched since is checked again. The record is JSON: reading it runs no code.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline_lib.core.workspace import Workspace, atomic_write_text, digest_of

log = logging.getLogger(__name__)

RECORD = "initial-weights.json"
LOOKUP_ENV = ("TORCH_HOME", "XDG_CACHE_HOME")  # where torch.hub looks for downloaded weights


def record_path(workspace: Workspace) -> Path:
    """Where the answers are kept."""
    return workspace.cache / RECORD


def checked_weights(
    workspace: Workspace | None, question: tuple[str, ...], check: Callable[[], Path | None]
) -> Path | None:
    """The weights file check() finds for question (None: the run starts from no file), taken from the workspace's
    record when check() found the same before and the file is unchanged since; check() is run (and its answer kept)
    otherwise. Without a workspace, check() is run."""
    if workspace is None:
        return check()
    known = _read(workspace).get(_key(question))
    if isinstance(known, dict) and _unchanged(known):
        log.debug("initial weights %s: checked before, unchanged (%s)", question, known.get("path"))
        return None if known.get("path") is None else Path(known["path"])
    found = check()
    remember(workspace, question, found)
    return found


def remember(workspace: Workspace, question: tuple[str, ...], found: Path | None) -> None:
    """Keep what the check found for question (e.g. one made before the workspace existed), with the file's stamp;
    nothing when that is kept already."""
    record = _read(workspace)
    entry = {"path": None if found is None else str(found), "stamp": _stamp(found)}
    if record.get(_key(question)) == entry:
        return
    try:
        text = json.dumps(record | {_key(question): entry}, indent=1, sort_keys=True)
        atomic_write_text(record_path(workspace), text)
    except OSError as error:  # a read-only workspace: the next run checks again
        log.warning("the initial weights check is not remembered in %s: %s", record_path(workspace), error)


def _key(question: tuple[str, ...]) -> str:
    """The record's key of a question: its parts and where torch.hub looks the file up."""
    return digest_of(*question, *(f"{name}={os.environ.get(name, '')}" for name in LOOKUP_ENV))


def _stamp(path: Path | None) -> list[int] | None:
    """[mtime_ns, size] of the file, None for no file or one that is gone."""
    if path is None:
        return None
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return [stat.st_mtime_ns, stat.st_size]


def _unchanged(known: dict[str, Any]) -> bool:
    """Whether a remembered answer still holds: no file then, or the same file with the same stamp now."""
    path = known.get("path")
    if path is None:
        return "path" in known and known.get("stamp") is None
    stamp = _stamp(Path(str(path)))
    return stamp is not None and stamp == known.get("stamp")


def _read(workspace: Workspace) -> dict[str, Any]:
    """The record ({} when there is none or it cannot be read: the check then runs again)."""
    path = record_path(workspace)
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        log.warning("ignoring the unreadable %s: %s", path, error)
        return {}
    return data if isinstance(data, dict) else {}
