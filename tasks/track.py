"""Tasks that record a pipeline run in MLflow (never cached: every flow run gets its full lineage)."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torchvision
from prefect import task
from prefect.cache_policies import NO_CACHE

from pipeline_lib.assess import calibration as calibration_lib
from pipeline_lib.assess import comparison, stats
from pipeline_lib.assess import evaluate as evaluate_lib
from pipeline_lib.assess.predict import ModelCalibration, parse_calibration
from pipeline_lib.assess.registry import ChampionDecision, load_champion, register_model
from pipeline_lib.core import catalog as cat
from pipeline_lib.core import devices
from pipeline_lib.core.config import NormalizeConfig, PipelineConfig, config_to_yaml, flatten_config
from pipeline_lib.core.tracking.logged_models import IMAGE_SIZE_TAG, ModelNotFoundError, log_pytorch_model
from pipeline_lib.core.tracking.runs import (
    CATALOG_ARTIFACTS,
    Tracker,
    end_orphaned_runs,
    epoch_metrics,
    owner_tags,
    run_catalog,
    start_run,
)
from pipeline_lib.core.tracking.store import tracking_uri
from pipeline_lib.core.tracking.versions import CHAMPION, champion_calibration, current_champion, find_version
from pipeline_lib.core.workspace import Ref, Workspace
from pipeline_lib.learn import models, preprocess
from pipeline_lib.learn import train as train_lib
from tasks.stages import EvalOutput, TrainOutput

log = logging.getLogger(__name__)


@task(name="mlflow-start", cache_policy=NO_CACHE)
def start_tracking(root: str, config: PipelineConfig, run_name: str, tags: dict[str, str]) -> Tracker:
    """Open the pipeline's MLflow run and log the whole config (params + config.yaml); first mark KILLED the runs a
    killed process left RUNNING in this workspace (the caller holds the workspace lock)."""
    workspace = Workspace.create(root)
    uri = tracking_uri(config.tracking.uri, workspace)
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
def log_training(tracker: Tracker, output: TrainOutput, logged_live: bool = False) -> None:
    """Per-epoch curves (those not logged live as each epoch ended), the best epoch, the class balance (counts, loss
    weights) and the weights' provenance.

    logged_live: training ran in this flow run, so the epochs after output.resumed_from_epoch are in MLflow already.
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
    tracker.set_tags(
        {
            "aidetect.weights": output.weights_name,
            "aidetect.weights_sha256": output.weights_sha256,
            "aidetect.device": output.device,
            "aidetect.precision": output.precision,
            "aidetect.augment_on": output.augment_on,
        }
    )
    history = pd.DataFrame(output.history)
    if len(history):
        tracker.log_table(history, "training/history.json")
        with tempfile.TemporaryDirectory() as folder:
            tracker.log_artifact(
                train_lib.plot_learning_curves(output.history, Path(folder) / "learning_curves.png"), "training"
            )


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
    """Log the best model (pickle format, with its state_dict beside it) unless this checkpoint is registered already;
    maybe move the alias to it.

    alias is `champion`, or `loo-<generator>` for a leave-one-generator-out run (which never touches `champion`).
    The model holding the alias is scored on this test split too (on device, in batches): rebuilt from its
    state_dict (never unpickled unless trust_pickle), decoded with its own recorded normalisation and calibrated with
    its own temperature (its version's calibration tag); McNemar's paired test on the two models' per-image
    correctness says whether the difference is more than noise. When some of these test images were in that model's
    training or validation data the two are not comparable: the alias stays unless promote (--promote). A holder
    that cannot be loaded is reported and skipped.
    """
    workspace = Workspace.create(root)
    existing = find_version(tracker.uri, name, model_ref.digest)
    if existing is not None:
        tracker.set_tags({"aidetect.model_version": existing.version, "aidetect.model_reused": "true"})
        aliases = list(getattr(existing, "aliases", None) or [])
        return {"version": existing.version, "promoted": False, "reason": "same checkpoint already registered"} | {
            "aliases": aliases
        }
    model, meta = models.load_model(model_ref.resolve(workspace))
    size = int(meta["image_size"])
    example = torch.rand(1, 3, size, size).numpy()
    requirements = [
        f"torch=={torch.__version__.split('+')[0]}",
        f"torchvision=={torchvision.__version__.split('+')[0]}",
    ]
    uri = log_pytorch_model(tracker, model, example, requirements, checkpoint=model_ref.resolve(workspace))
    holder = current_champion(tracker.uri, name, alias)
    unfair = _not_comparable(tracker.uri, holder, evaluation, workspace)
    champion, skipped = _score_champion(workspace, tracker.uri, name, alias, evaluation, device, trust_pickle)
    champion_score = _rescore_champion(test_digest, holder, champion)
    paired = _paired_test(workspace, tracker, evaluation, champion)
    decision = register_model(
        tracker,
        uri,
        name,
        float(evaluation.metrics["accuracy"]),
        test_digest,
        model_ref.digest,
        champion_score=champion_score,
        image_size=size,
        calibration=json.dumps(ModelCalibration(evaluation.temperature, normalize).as_dict()),
        alias=alias,
        not_comparable=unfair,
        promote=promote,
        architecture=str(meta["model_name"]),
    )
    _log_decision(tracker, decision, rescored=champion_score is not None, image_size=size)
    if skipped:
        tracker.set_tags({"aidetect.champion_skipped": skipped})
    return paired | ({"champion_skipped": skipped} if skipped else {}) | {
        "version": decision.version,
        "promoted": decision.promoted,
        "reason": decision.reason,
        "alias": alias,
        "comparable": unfair is None,
        "challenger_score": decision.challenger_score,
        "champion_score": decision.champion_score,
        "champion_version": decision.champion_version,
    }


def _not_comparable(uri: str, holder: Any, evaluation: EvalOutput, workspace: Workspace) -> str | None:
    """Why the alias holder cannot be compared on this test split (it trained on some of it), or None."""
    if holder is None:
        return None
    trained_on = run_catalog(uri, holder.run_id)
    if trained_on is None:
        log.warning("version %s of the registry records no training catalog: overlap not checked", holder.version)
        return None
    test = pd.read_parquet(evaluation.predictions.resolve(workspace), columns=["sha256"])["sha256"]
    return comparison.overlap_reason(test.tolist(), comparison.seen_in_training(trained_on), str(holder.version))


def _score_champion(
    workspace: Workspace,
    uri: str,
    name: str,
    alias: str,
    evaluation: EvalOutput,
    device: str = "cpu",
    trust_pickle: bool = False,
) -> tuple[pd.DataFrame | None, str]:
    """(The alias holder's predictions on this run's test images, same order as the challenger's, or None; why it
    was skipped, "" if it was not).

    The images are decoded with the holder's own normalisation and its logits calibrated with its own temperature.
    """
    if current_champion(uri, name, alias) is None:
        return None, ""
    try:
        champion, size = load_champion(uri, name, alias, trust_pickle)
        recorded = champion_calibration(uri, name, alias)
        calibration = parse_calibration(recorded, f"calibration tag of {name}@{alias}") if recorded else None
    except (ModelNotFoundError, ValueError) as error:
        log.warning("%s not scored, skipped: %s", alias, error)
        return None, str(error)
    calibration = calibration or ModelCalibration()
    rows = pd.read_parquet(evaluation.predictions.resolve(workspace))
    if rows.empty:
        return None, ""
    policy = calibration.normalize
    policy = policy if policy is not None and policy.mode != "none" else None
    images = preprocess.load_tensors(workspace, rows["sha256"].tolist(), size, policy)
    logits = evaluate_lib.predict_logits(champion, images, device=devices.resolve_device(device))
    p_ai = calibration_lib.apply_temperature(logits, calibration.temperature)
    threshold = float(evaluation.metrics["threshold"])
    return evaluate_lib.predictions_table(rows, p_ai, threshold, p_ai_raw=evaluate_lib.softmax_p_ai(logits)), ""


def _rescore_champion(test_digest: str, holder: Any, champion: pd.DataFrame | None) -> float | None:
    """The holder's accuracy on this test split when it was scored on another one; else None (nothing to do)."""
    if champion is None or holder is None or (holder.tags or {}).get("test_digest") == test_digest:
        return None
    return float(champion["correct"].mean()) if len(champion) else None


def _paired_test(
    workspace: Workspace, tracker: Tracker, evaluation: EvalOutput, champion: pd.DataFrame | None
) -> dict[str, Any]:
    """McNemar on champion vs challenger correctness over the same test images: metric and tags, and a log line."""
    if champion is None or champion.empty:
        return {}
    challenger = pd.read_parquet(evaluation.predictions.resolve(workspace))
    result = stats.mcnemar(champion["correct"].to_numpy(bool), challenger["correct"].to_numpy(bool))
    message = result.describe()
    log.info("champion vs challenger: %s", message)
    counts = {"registry.mcnemar_b": float(result.b), "registry.mcnemar_c": float(result.c)}
    tracker.log_metrics({"registry.mcnemar_p": result.p_value} | counts)
    tracker.set_tags({"registry.mcnemar_p": f"{result.p_value:.6g}", "aidetect.champion_mcnemar": message})
    return {"mcnemar_p": result.p_value, "mcnemar": message}


def _log_decision(
    tracker: Tracker, decision: ChampionDecision, rescored: bool, image_size: int
) -> None:
    """Both scores as metrics, the decision as tags of the run."""
    scores = {"registry.challenger_score": decision.challenger_score}
    if decision.champion_score is not None:
        scores["registry.champion_score"] = decision.champion_score
    tracker.log_metrics(scores | {"registry.promoted": float(decision.promoted)})
    tracker.set_tags(
        {
            "aidetect.model_version": decision.version,
            "aidetect.champion_decision": decision.reason,
            "aidetect.champion_promoted": str(decision.promoted).lower(),
            "aidetect.champion_previous_version": decision.champion_version or "",
            "aidetect.champion_rescored": str(rescored).lower(),
            "aidetect.champion_alias": decision.alias,
            "aidetect.champion_comparable": str(decision.comparable).lower(),
            f"aidetect.{IMAGE_SIZE_TAG}": str(image_size),
        }
    )


@task(name="mlflow-finish", cache_policy=NO_CACHE)
def finish_tracking(tracker: Tracker, status: str) -> None:
    """Close the run as FINISHED or FAILED."""
    tracker.finish(status)
