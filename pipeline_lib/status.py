"""What a workspace holds: latest snapshots, counts, pending reviews."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from pipeline_lib.catalog import STATUS_OK, conform, counts
from pipeline_lib.review import read_decisions
from pipeline_lib.workspace import Workspace

STAGE_ORDER = ("ingest", "fingerprint", "dedup", "review", "split")


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
