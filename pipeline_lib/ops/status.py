"""What a workspace holds: latest snapshots, counts, pending reviews, imported folders file by file, last runs."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline_lib.acquire.crawl_log import crawl_log_path
from pipeline_lib.acquire.imports import FolderAccount, account_folder, read_imports
from pipeline_lib.core.catalog import STATUS_OK, conform, counts
from pipeline_lib.core.config import FolderSource
from pipeline_lib.core.workspace import Workspace
from pipeline_lib.curate.review import read_decisions

STAGE_ORDER = ("ingest", "fingerprint", "dedup", "review", "split")
RUNS_FILE = "runs.jsonl"


def latest_snapshot(workspace: Workspace, stage: str) -> Path | None:
    """The most recently written catalog snapshot of a stage, or None."""
    candidates = sorted(workspace.catalog.glob(f"{stage}-*.parquet"), key=lambda p: p.stat().st_mtime_ns)
    return candidates[-1] if candidates else None


def latest_catalog(workspace: Workspace, stages: tuple[str, ...] = STAGE_ORDER) -> tuple[str, pd.DataFrame] | None:
    """The newest snapshot of the furthest stage that has one, as (stage, table)."""
    for stage in reversed(stages):
        path = latest_snapshot(workspace, stage)
        if path is not None:
            return stage, conform(pd.read_parquet(path))
    return None


def workspace_status(workspace: Workspace) -> dict[str, Any]:
    """Catalog counts by status, label and split, and how many images await review."""
    found = latest_catalog(workspace)
    if found is None:
        return {"workspace": str(workspace.root), "stage": None, "images": 0}
    stage, catalog = found
    decisions = read_decisions(workspace)
    dedup = latest_snapshot(workspace, "dedup")
    undecided = 0
    if dedup is not None:
        deduped = pd.read_parquet(dedup)
        keepers = deduped[deduped["status"] == STATUS_OK]
        undecided = int((~keepers["sha256"].isin(decisions)).sum())
    return {
        "workspace": str(workspace.root),
        "stage": stage,
        "images": len(catalog),
        **counts(catalog),
        "decisions": len(decisions),
        "undecided": undecided,
    }


def runs_path(workspace: Workspace) -> Path:
    """The workspace's list of runs (one JSON line each), read by `aidetect status` without MLflow."""
    return workspace.root / RUNS_FILE


def record_run(workspace: Workspace, entry: Mapping[str, Any]) -> None:
    """Append one run's line (run id, kind, status, times, test accuracy, model version)."""
    line = json.dumps(dict(entry), default=str, sort_keys=True) + "\n"
    with runs_path(workspace).open("a", encoding="utf-8") as handle:
        handle.write(line)  # one write of one line: whole lines even when two runs end together


def recent_runs(workspace: Workspace, limit: int = 5) -> list[dict[str, Any]]:
    """The last `limit` runs recorded in the workspace, newest first (unreadable lines are skipped)."""
    path = runs_path(workspace)
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:
            continue
    return entries[::-1][:limit]


def folder_accounts(workspace: Workspace, folders: Sequence[FolderSource] | None = None) -> list[FolderAccount]:
    """What became of every file of the given folder sources (default: the workspace's imports).

    Judged against the newest ingest snapshot: ingest catalogs every file of the (cumulative) crawl log, while the
    later stages' snapshots are as old as the last full run and miss what a crawl or import has ingested since.
    """
    folders = read_imports(workspace) if folders is None else folders
    if not folders:
        return []
    log_file = crawl_log_path(workspace)
    crawl_log = pd.read_parquet(log_file) if log_file.is_file() else pd.DataFrame(columns=["url", "sha256", "error"])
    found = latest_catalog(workspace, ("ingest",))
    catalog = found[1] if found is not None else None
    return [account_folder(source, crawl_log, catalog) for source in folders]
