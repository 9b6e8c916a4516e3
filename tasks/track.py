"""Tasks that record a pipeline run in MLflow (never cached: every flow run gets its full lineage)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from pipeline_lib.assess import registry
from pipeline_lib.assess.model_calibration import ModelCalibration
from pipeline_lib.core import catalog as cat
from pipeline_lib.core.config import NormalizeConfig, PipelineConfig, config_to_yaml, flatten_config
from pipeline_lib.core.tracking.runs import (
    CATALOG_ARTIFACTS,
    Tracker,
    end_orphaned_runs,
    epoch_metrics,
    owner_tags,
    start_run,
)
from pipeline_lib.core.tracking.versions import CHAMPION
from pipeline_lib.core.tracking.workspace_store import open_store
from pipeline_lib.core.workspace import Ref, Workspace
from pipeline_lib.learn.history import plot_learning_curves
from tasks.stages import EvalOutput, TrainOutput

LEARNING_CURVES = "learning_curves.png"


@task(name="mlflow-start", cache_policy=NO_CACHE)
def start_tracking(root: str, config: PipelineConfig, run_name: str, tags: dict[str, str]) -> Tracker:
    """Open the pipeline's MLflow run and log the whole config (params + config.yaml); first mark KILLED the runs a
    killed process left RUNNING in this workspace (the caller holds the workspace lock). The store is checked first
    and, when it is the workspace's own, its artifact locations kept inside this workspace (open_store)."""
    workspace = Workspace.create(root)
    uri = open_store(config.tracking.uri, workspace)
    orphans = end_orphaned_runs(uri, config.tracking.experiment, workspace)
    owner = owner_tags(workspace)
    tracker = start_run(uri, config.tracking.experiment, workspace, run_name, tags | owner)
    if orphans:
        tracker.set_tags({"aidetect.killed_orphans": ",".join(orphans)})
    tracker.log_params(flatten_config(config))
    tracker.log_text(config_to_yaml(config), "config.yaml")
    return tracker


@task(name="mlflow-log-stage", cache_policy=NO_CACHE)
def log_stage(
    tracker: Tracker,
    stage: str,
    state: str,
    metrics: dict[str, float],
    notes: list[str],
    table: list[dict[str, Any]],
) -> None:
    """Log a stage's metrics, its cache state, its notes and its table (e.g. crawl counts per keyword)."""
    tracker.log_metrics(metrics)
    tracker.set_tags({f"aidetect.stage.{stage}": state})
    if notes:
        tracker.log_text("\n".join(notes) + "\n", f"notes/{stage}.txt")
    if table:
        tracker.log_table(pd.DataFrame(table), f"stages/{stage}.json")


@task(name="mlflow-log-datasets", cache_policy=NO_CACHE)
def log_datasets(root: str, tracker: Tracker, split_catalog: Ref) -> None:
    """Each split's table as an MLflow dataset input with its digest; the catalog snapshot as an artifact."""
    workspace = Workspace.create(root)
    table = cat.read_snapshot(workspace, split_catalog)
    usable = table[table["status"] == cat.STATUS_OK]
    contexts = {"train": "training", "val": "validation", "test": "test"}
    for split, context in contexts.items():
        rows = usable[usable["split"] == split][["sha256", "label", "group", "source", "url", "path"]]
        digest = tracking_digest(split_catalog.digest, split)
        tracker.log_dataset(rows.reset_index(drop=True), f"catalog-{split}", digest, str(split_catalog.path), context)
    tracker.log_artifact(split_catalog.resolve(workspace), CATALOG_ARTIFACTS)
    tracker.set_tags({"aidetect.catalog": split_catalog.path, "aidetect.catalog_digest": split_catalog.digest})


def tracking_digest(catalog_digest: str, split: str) -> str:
    """Digest naming one split of one catalog snapshot."""
    from pipeline_lib.core.workspace import digest_of

    return digest_of(catalog_digest, split)[:16]


@task(name="mlflow-log-training", cache_policy=NO_CACHE)
def log_training(tracker: Tracker, output: TrainOutput, logged_live: bool = False, root: str | None = None) -> None:
    """Per-epoch curves (those not logged live as each epoch ended), the best epoch, the class balance (counts, loss
    weights) and the weights' provenance.

    logged_live: training ran in this flow run, so the epochs after output.resumed_from_epoch are in MLflow already.
    root: the workspace, where the learning curves' picture is kept beside the model (drawn when the model was
    trained: a run whose training is cached logs the same picture without drawing it).
    """
    skip_after = (output.resumed_from_epoch or 0) if logged_live else None
    for epoch in output.history:
        step = int(epoch["epoch"])
        if skip_after is None or step <= skip_after:
            tracker.log_metrics(epoch_metrics(epoch), step=step)
    tracker.log_metrics({"train.best_epoch": output.best_epoch, "train.stopped_early": float(output.stopped_early)})
    if output.resumed_from_epoch is not None:
        tracker.log_metrics({"train.resumed_from_epoch": float(output.resumed_from_epoch)})
    tracker.log_metrics({f"train.class_balance.{k}": v for k, v in output.balance.items()})
    tracker.log_metrics({f"train.features_{k}": v for k, v in output.features.items()})  # probe: cache hits
    tracker.set_tags(
        {
            "aidetect.weights": output.weights_name,
            "aidetect.weights_sha256": output.weights_sha256,
            "aidetect.device": output.device,
            "aidetect.precision": output.precision,
            "aidetect.augment_on": output.augment_on,
            "aidetect.train_mode": output.mode,
        }
    )
    history = pd.DataFrame(output.history)
    if len(history):
        tracker.log_table(history, "training/history.json")
        if root is not None:
            tracker.log_artifact(_learning_curves(Workspace.create(root), output, redraw=logged_live), "training")
            return
        with tempfile.TemporaryDirectory() as folder:
            tracker.log_artifact(plot_learning_curves(output.history, Path(folder) / LEARNING_CURVES), "training")


def _learning_curves(workspace: Workspace, output: TrainOutput, redraw: bool) -> Path:
    """The learning curves' picture beside the model in the workspace: drawn when missing, or when redraw (the model
    was trained in this run), else the one drawn when it was trained."""
    path = output.model.resolve(workspace).parent / LEARNING_CURVES
    if redraw or not path.is_file():
        plot_learning_curves(output.history, path)
    return path


@task(name="mlflow-log-evaluation", cache_policy=NO_CACHE)
def log_evaluation(root: str, tracker: Tracker, evaluation: EvalOutput, report_index: Ref) -> None:
    """Test metrics, plots, predictions and the Grad-CAM report folder, all in the same run."""
    workspace = Workspace.create(root)
    tracker.log_metrics({f"test.{k}": v for k, v in evaluation.metrics.items()})
    for path in evaluation.plots.values():
        tracker.log_artifact(workspace.root / path, "plots")
    tracker.log_artifact(evaluation.predictions.resolve(workspace), "evaluation")
    tracker.log_artifact(report_index.resolve(workspace).parent, "report")


@task(name="mlflow-register", cache_policy=NO_CACHE)
def register(
    root: str,
    tracker: Tracker,
    model_ref: Ref,
    evaluation: EvalOutput,
    test_digest: str,
    name: str,
    normalize: NormalizeConfig | None = None,
    alias: str = CHAMPION,
    promote: bool = False,
    device: str = "cpu",
    trust_pickle: bool = False,
) -> dict[str, Any]:
    """Register the best model and maybe move the alias to it (pipeline_lib.assess.registry decides: the holder
    re-scored with its own calibration, the overlap check, McNemar's paired test); the decision as a small dict."""
    workspace = Workspace.create(root)
    challenger = registry.Challenger(
        checkpoint=model_ref.resolve(workspace),
        model_digest=model_ref.digest,
        predictions=evaluation.predictions.resolve(workspace),
        metrics=evaluation.metrics,
        calibration=ModelCalibration(evaluation.temperature, normalize),
        test_digest=test_digest,
    )
    return registry.register_challenger(workspace, tracker, challenger, name, alias, promote, device, trust_pickle)


@task(name="mlflow-finish", cache_policy=NO_CACHE)
def finish_tracking(tracker: Tracker, status: str) -> None:
    """Close the run as FINISHED or FAILED."""
    tracker.finish(status)
