"""Cache options for stage tasks: keyed by pipeline_lib.core.cachekey (inputs, named files, code, libraries), stored
inside the workspace as typed JSON (tasks.results: never pickles)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import Task
from prefect.cache_policies import NO_CACHE, CachePolicy
from prefect.context import TaskRunContext
from prefect.transactions import get_transaction

from pipeline_lib.core import cachekey, code_index
from pipeline_lib.core.workspace import Workspace
from tasks.results import StageRecordStorage, StageResultSerializer


def result_folder(workspace: Workspace) -> Path:
    """Where stage results live: workspace/prefect/results, one typed-JSON file per cache key."""
    return workspace.prefect / "results"


def record_folder(workspace: Workspace) -> Path:
    """Where Prefect's records of the stage results live (tasks.results.StageRecordStorage reads them)."""
    return workspace.prefect / "keys"


@dataclass
class StageKeyPolicy(CachePolicy):
    """A Prefect cache policy whose key is cachekey.stage_key: the task's fixed parts plus its inputs' parts."""

    fixed: tuple[tuple[str, str], ...] = field(default_factory=tuple)  # task name, code and library parts

    def compute_key(
        self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any
    ) -> str:
        """The stage key's digest (Prefect's transaction key, and the name of a stage's own output folder)."""
        defaults = _defaults(task_ctx.task.fn) if task_ctx is not None else {}
        return cachekey.stage_key(dict(self.fixed), defaults | inputs).digest


def _defaults(fn: Any) -> dict[str, Any]:
    """A function's parameter defaults (mapped task runs get their inputs without them)."""
    parameters = inspect.signature(fn).parameters.values()
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


def fixed_parts(task: Task[Any, Any], index: code_index.CodeIndex) -> dict[str, str]:
    """The parts of a task's key that do not depend on its arguments: its name, its code, its libraries."""
    fn = task.fn
    return {"task": f"{fn.__module__}:{fn.__name__}"} | index.task_parts(fn.__module__, fn.__name__)


def bound_inputs(task: Task[Any, Any], args: tuple[Any, ...]) -> dict[str, Any]:
    """The task's parameters by name, defaults filled in, as Prefect hands them to the cache policy."""
    bound = inspect.signature(task.fn).bind(*args)
    bound.apply_defaults()
    return dict(bound.arguments)


def stage_key(task: Task[Any, Any], args: tuple[Any, ...], index: code_index.CodeIndex) -> cachekey.StageKey:
    """The key a call task(*args) gets, with its parts (what the recorder logs on the stage's MLflow run)."""
    return cachekey.stage_key(fixed_parts(task, index), bound_inputs(task, args))


def cached(
    task: Task[Any, Any],
    workspace: Workspace,
    refresh: bool = False,
    index: code_index.CodeIndex | None = None,
    cache: bool = True,
) -> Task[Any, Any]:
    """The task keyed by its stage key, results kept in the workspace as typed JSON; cache=False: it runs every
    time."""
    if not cache:
        return task.with_options(cache_policy=NO_CACHE, persist_result=False)
    results = result_folder(workspace)
    records = StageRecordStorage(basepath=str(record_folder(workspace)), results=str(results))
    fixed = tuple(sorted(fixed_parts(task, index or code_index.CodeIndex()).items()))
    return task.with_options(
        cache_policy=StageKeyPolicy(key_storage=records, fixed=fixed),
        persist_result=True,
        result_storage=results,
        result_serializer=StageResultSerializer(),
        refresh_cache=refresh,
    )


def current_stage_key() -> str:
    """The stage key of the running task (its transaction's key); RuntimeError outside a cached stage task."""
    transaction = get_transaction()
    if transaction is None or not transaction.key:
        raise RuntimeError("this task keys its output folder by its stage key: run it through tasks.caching.cached")
    return transaction.key
