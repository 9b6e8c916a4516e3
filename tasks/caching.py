"""Cache options for stage tasks: content-keyed, stored inside the workspace."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from prefect import Task
from prefect.cache_policies import INPUTS, TASK_SOURCE

from pipeline_lib.workspace import Workspace


def result_folder(workspace: Workspace) -> Any:
    """Where stage results live: workspace/prefect/results, one file per cache key holding the whole record.

    Key and result in one file (no separate key storage): a result file that is missing or unreadable is a cache
    miss, so the stage is recomputed instead of failing with "Path ... does not exist".
    """
    return workspace.prefect / "results"


def cached(task: Task[Any, Any], workspace: Workspace, refresh: bool = False, expiration: timedelta | None = None):
    """The task keyed by its inputs (small Refs with digests) and its source, results kept in the workspace."""
    return task.with_options(
        cache_policy=INPUTS + TASK_SOURCE,
        persist_result=True,
        result_storage=result_folder(workspace),
        refresh_cache=refresh,
        cache_expiration=expiration,
    )
