"""A copy of the project's code in tmp_path, edited there: what a code change does to a key, without touching the
files of the checkout that the other tests import."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline_lib.core.code_index import PROJECT_ROOT, CodeIndex, producer_digest

PACKAGES = ("pipeline_lib", "tasks")


def copy_project(target: Path) -> Path:
    """The project's packages (sources and data files, no caches) copied under target; its root."""
    for package in PACKAGES:
        shutil.copytree(PROJECT_ROOT / package, target / package, ignore=shutil.ignore_patterns("__pycache__"))
    return target


def edit(root: Path, relative: str, old: str, new: str) -> None:
    """Replace the one occurrence of old in a copied file (AssertionError if it is not there exactly once)."""
    path = root / relative
    text = path.read_text(encoding="utf-8")
    assert text.count(old) == 1, f"{relative} holds {old!r} {text.count(old)} times, expected once"
    path.write_text(text.replace(old, new), encoding="utf-8")


def digest_in(root: Path, *functions: Callable[..., Any]) -> str:
    """The producer digest of the functions as the code under root defines them (a fresh index)."""
    return producer_digest(*functions, index=CodeIndex(root))
