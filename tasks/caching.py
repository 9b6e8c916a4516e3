"""Cache options for stage tasks: content-keyed, stored inside the workspace."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from prefect import Task
from prefect.cache_policies import INPUTS, TASK_SOURCE

from pipeline_lib.workspace import Workspace


def cached(task: Task[Any, Any], workspace: Workspace, refresh: bool = False, expiration: timedelta | None = None):
    """The task keyed by its inputs (small Refs with digests) and its source, results kept in the workspace."""
    policy = (INPUTS + TASK_SOURCE).configure(key_storage=str(workspace.prefect / "cache"))
    return task.with_options(
        cache_policy=policy,
        persist_result=True,
        refresh_cache=refresh,
        cache_expiration=expiration,
    )
