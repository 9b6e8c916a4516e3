"""The nested run of each stage under a pipeline run: its cache state, duration, metrics and cache-key parts."""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import mlflow
from mlflow import MlflowClient

from pipeline_lib.core.tracking.runs import Tracker, epoch_metrics, metric_rows
from pipeline_lib.core.tracking.store import quiet

STAGE_KIND = "stage"  # aidetect.kind of the nested run of one stage (the pipeline's run has kind "pipeline")
KEY_PARAM_PREFIX = "key."  # params of a stage run: the parts of its cache key (pipeline_lib.core.cachekey)
OUTPUT_TAG = "aidetect.output_digest"  # tag of a stage run: the content digest of what the stage handed on


def stage_run(
    parent: Tracker,
    stage: str,
    state: str,
    metrics: Mapping[str, float],
    seconds: float,
    failed: bool = False,
    params: Mapping[str, str] | None = None,
    tags: Mapping[str, str] | None = None,
    ended_at: float | None = None,
    history: Sequence[Mapping[str, Any]] = (),
) -> Tracker:
    """A finished child run of parent for one stage (by id, thread-safe): its metrics, cache state and duration, and
    the params and tags given (the parts of its cache key).

    The run starts `seconds` before ended_at (time.time(), default now) and ends then, so the UI shows how long the
    stage really took. history: per-epoch rows (epoch, train_loss, ...) logged as train.* metrics by step.
    """
    experiment_id, inherited = _parent_context(parent.uri, parent.run_id)
    all_tags = dict(inherited) | dict(tags or {}) | {
        "mlflow.parentRunId": parent.run_id,
        "aidetect.kind": STAGE_KIND,
        "aidetect.stage": stage,
        "aidetect.state": state,
    }
    end_ms = int((time.time() if ended_at is None else ended_at) * 1000)
    start_ms = end_ms - int(max(seconds, 0.0) * 1000)
    with quiet():
        run = parent.client.create_run(experiment_id, start_time=start_ms, run_name=stage, tags=all_tags)
    child = Tracker(parent.uri, run.info.run_id)
    rows = metric_rows(dict(metrics) | {"stage.seconds": float(seconds)})
    values = [mlflow.entities.Param(str(k), str(v)[:6000]) for k, v in (params or {}).items()]
    for start in range(0, max(len(rows), len(values)), 100):  # one call for a stage's params and metrics
        child.client.log_batch(child.run_id, metrics=rows[start : start + 100], params=values[start : start + 100])
    for row in history:
        child.log_metrics(epoch_metrics(row), step=int(row["epoch"]))
    status = "FAILED" if failed else "FINISHED"
    parent.client.set_terminated(child.run_id, status=status, end_time=end_ms)
    return child


@dataclass(frozen=True)
class EarlierStageRun:
    """What a stage's latest nested run recorded: its key's parts and the digest of its output."""

    key: dict[str, str]
    output: str = ""  # OUTPUT_TAG; "" when that run recorded none


def earlier_stage_runs(parent: Tracker, workspace: str, scan: int = 200) -> dict[str, EarlierStageRun]:
    """Stage name -> its latest nested run in this workspace under another parent run (one query).

    Only the latest `scan` stage runs of the experiment are looked at (other workspaces may share it).
    """
    experiment_id, _ = _parent_context(parent.uri, parent.run_id)
    with quiet():
        runs = parent.client.search_runs(
            [experiment_id],
            filter_string=f"tags.`aidetect.kind` = '{STAGE_KIND}'",
            order_by=["attributes.start_time DESC"],
            max_results=scan,
        )
    found: dict[str, EarlierStageRun] = {}
    for run in runs:
        tags, stage = run.data.tags, run.data.tags.get("aidetect.stage", "")
        if stage in found or tags.get("aidetect.workspace") != workspace:
            continue
        if tags.get("mlflow.parentRunId") != parent.run_id:
            params = run.data.params
            key = {k[len(KEY_PARAM_PREFIX) :]: v for k, v in params.items() if k.startswith(KEY_PARAM_PREFIX)}
            found[stage] = EarlierStageRun(key, tags.get(OUTPUT_TAG, ""))
    return found


@functools.lru_cache(maxsize=64)
def _parent_context(uri: str, run_id: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """Experiment id and the lineage tags (flow run id, git commit) a parent run hands to its stage runs."""
    with quiet():
        run = MlflowClient(tracking_uri=uri).get_run(run_id)
    keys = ("prefect.flow_run_id", "prefect.deployment_id", "mlflow.source.git.commit")
    return run.info.experiment_id, tuple((key, run.data.tags[key]) for key in keys if key in run.data.tags)


def stage_runs(parent: Tracker) -> dict[str, dict[str, Any]]:
    """The child stage runs of parent by stage name (the last one when a stage ran twice)."""
    client = parent.client
    with quiet():
        experiment_id = client.get_run(parent.run_id).info.experiment_id
        runs = client.search_runs(
            [experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}'",
            order_by=["attributes.start_time ASC"],
        )
    return {
        run.data.tags.get("aidetect.stage", run.info.run_name): {
            "run_id": run.info.run_id,
            "status": run.info.status,
            "state": run.data.tags.get("aidetect.state"),
            "metrics": dict(run.data.metrics),
        }
        for run in runs
    }
