"""The aidetect flows: stage order, caching and the review gate. No image math here."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.context import get_run_context
from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
from prefect.states import State

from flows import review_gate
from pipeline_lib import tracking as tracking_lib
from pipeline_lib.config import PipelineConfig
from pipeline_lib.crawl import crawl_log_path
from pipeline_lib.imports import with_imports
from pipeline_lib.workspace import Workspace, digest_of, file_sha256, listing_digest
from tasks import stages, track
from tasks.caching import cached


class StageRecorder:
    """Runs stage tasks, keeps each one's final state name, and logs it to MLflow as it goes."""

    def __init__(self, workspace: Workspace, refresh: bool, tracker: tracking_lib.Tracker) -> None:
        self.workspace = workspace
        self.refresh = refresh
        self.tracker = tracker
        self.states: dict[str, str] = {}

    def run(self, name: str, task: Any, *args: Any, expiration: timedelta | None = None) -> Any:
        state: State = cached(task, self.workspace, self.refresh, expiration)(*args, return_state=True)
        self.states[name] = state.name
        result = state.result()  # raises if the stage failed
        if isinstance(result, stages.StageResult):
            track.log_stage(self.tracker, name, state.name, result.metrics, result.notes, result.table)
            if result.table:
                create_table_artifact(result.table, key=f"aidetect-{name}", description=f"{name}: per-source counts")
        else:
            track.log_stage(self.tracker, name, state.name, {}, [], [])
        return result


def _flow_run_tags(kind: str = "pipeline") -> dict[str, str]:
    context = get_run_context()
    flow_run = getattr(context, "flow_run", None)
    return {
        "aidetect.kind": kind,
        "prefect.flow_run_id": str(getattr(flow_run, "id", "")),
        "prefect.flow_run_name": str(getattr(flow_run, "name", "")),
        "prefect.deployment_id": str(getattr(flow_run, "deployment_id", "") or ""),
        "mlflow.source.git.commit": tracking_lib.code_version(),
    }


@flow(name="aidetect-pipeline")
def pipeline(config: PipelineConfig) -> dict[str, Any]:
    """Crawl, ingest, fingerprint, dedup, review, split, preprocess, train, evaluate and report."""
    workspace = Workspace.create(config.execution.workspace)
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: str(workspace.prefect / "results")}):
        return _run_pipeline(config, workspace)


def _run_pipeline(config: PipelineConfig, workspace: Workspace) -> dict[str, Any]:
    logger = get_run_logger()
    started = time.perf_counter()
    root = str(workspace.root)
    tags = _flow_run_tags()
    tracker = track.start_tracking(root, config, tags["prefect.flow_run_name"] or "pipeline", tags)
    stages_run = StageRecorder(workspace, config.execution.refresh_cache, tracker)
    try:
        catalog = _data_stages(config, workspace, stages_run)
        summary = _model_stages(config, workspace, stages_run, tracker, catalog)
    except BaseException:
        track.finish_tracking(tracker, "FAILED")
        raise
    summary |= {
        "states": stages_run.states,
        "seconds": round(time.perf_counter() - started, 2),
        "mlflow_run_id": tracker.run_id,
        "tracking_uri": tracker.uri,
        "workspace": root,
    }
    tracker.log_metrics({"pipeline.seconds": summary["seconds"]})
    track.finish_tracking(tracker, "FINISHED")
    _publish(summary, tracker)
    logger.info("stages: %s", ", ".join(f"{k}={v}" for k, v in stages_run.states.items()))
    return summary


def _crawl_and_ingest(
    config: PipelineConfig, workspace: Workspace, run: StageRecorder
) -> tuple[stages.StageResult, stages.StageResult]:
    """Crawl the configured sources plus the workspace's imported folders, then ingest."""
    root = str(workspace.root)
    sources = with_imports(config.sources, workspace)
    folders = listing_digest([source.path for source in sources.folders])  # new files in a folder miss the cache
    expiration = timedelta(hours=sources.recrawl_after_hours) if sources.recrawl_after_hours else None
    if config.execution.crawl:
        crawled = run.run("crawl", stages.crawl_sources, root, sources, folders, expiration=expiration)
    else:
        log_file = crawl_log_path(workspace)
        digest = file_sha256(log_file) if log_file.is_file() else ""
        crawled = run.run("crawl", stages.current_crawl_log, root, digest)
    return crawled, run.run("ingest", stages.ingest, root, crawled.catalog, config.ingest)


def _data_stages(config: PipelineConfig, workspace: Workspace, run: StageRecorder) -> stages.StageResult:
    root = str(workspace.root)
    _, ingested = _crawl_and_ingest(config, workspace, run)
    hashed = run.run("fingerprint", stages.fingerprint, root, ingested.catalog, config.dedup)
    deduped = run.run("dedup", stages.dedup, root, hashed.catalog, config.dedup)
    approved = review_gate.review_stage(config, workspace, run, deduped)  # may pause/suspend for people
    reshuffle = config.execution.reshuffle_splits
    return run.run("split", stages.make_split, root, approved.catalog, config.split, reshuffle)


def _model_stages(
    config: PipelineConfig,
    workspace: Workspace,
    run: StageRecorder,
    tracker: tracking_lib.Tracker,
    split: stages.StageResult,
) -> dict[str, Any]:
    root = str(workspace.root)
    track.log_datasets(root, tracker, split.catalog)
    run.run("preprocess", stages.preprocess_images, root, split.catalog, config.train.image_size)
    trained = run.run("train", stages.train, root, split.catalog, config.train)
    track.log_training(tracker, trained)
    evaluation = run.run("evaluate", stages.evaluate, root, split.catalog, trained.model, config.evaluate)
    title = f"aidetect — {config.train.model} on {split.catalog.path}"
    report_ref = run.run("report", stages.make_report, root, trained.model, evaluation, config.report, title)
    track.log_evaluation(root, tracker, evaluation, report_ref)
    test_digest = digest_of(split.catalog.digest, "test")[:16]
    registered = track.register(root, tracker, trained.model, evaluation, test_digest, config.tracking.registered_model)
    return {
        "metrics": evaluation.metrics,
        "report": str(report_ref.resolve(workspace)),
        "model": str(trained.model.resolve(workspace)),
        "registry": registered,
        "notes": split.notes,
    }


def _publish(summary: dict[str, Any], tracker: tracking_lib.Tracker) -> None:
    """Prefect artifacts: a markdown summary and a link to the MLflow run."""
    metrics = summary.get("metrics", {})
    nan = float("nan")
    rows = [{"stage": k, "state": v} for k, v in summary["states"].items()]
    create_table_artifact(rows, key="aidetect-stages", description="Stage states of this run")
    lines = [
        "# aidetect pipeline run",
        f"- test accuracy: **{metrics.get('accuracy', nan):.3f}** "
        f"(95% CI {metrics.get('accuracy_ci_low', nan):.3f}–{metrics.get('accuracy_ci_high', nan):.3f})",
        f"- ROC-AUC: {metrics.get('roc_auc', float('nan')):.3f}",
        f"- report: `{summary.get('report')}`",
        f"- MLflow run: `{tracker.run_id}` at `{tracker.uri}` (open with `aidetect ui`)",
        f"- registry: {summary.get('registry')}",
        f"- pipeline seconds: {summary['seconds']}",
    ]
    create_markdown_artifact("\n".join(lines), key="aidetect-summary", description="aidetect run summary")
    create_link_artifact(
        f"http://127.0.0.1:5000/{tracker.run_url()}",
        link_text="MLflow run (after `aidetect ui`)",
        key="aidetect-mlflow-run",
    )


@flow(name="aidetect-crawl")
def crawl_flow(config: PipelineConfig) -> dict[str, Any]:
    """Crawl and ingest only (grow the catalog without training); recorded as an MLflow run of kind crawl."""
    workspace = Workspace.create(config.execution.workspace)
    root = str(workspace.root)
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: str(workspace.prefect / "results")}):
        tags = _flow_run_tags(kind="crawl")
        tracker = track.start_tracking(root, config, f"crawl-{tags['prefect.flow_run_name']}", tags)
        run = StageRecorder(workspace, config.execution.refresh_cache, tracker)
        try:
            crawled, ingested = _crawl_and_ingest(config, workspace, run)
        except BaseException:
            track.finish_tracking(tracker, "FAILED")
            raise
        track.finish_tracking(tracker, "FINISHED")
    return {
        "states": run.states,
        "counts": crawled.metrics | ingested.metrics,
        "per_source": crawled.table,
        "catalog": ingested.catalog.path,
        "mlflow_run_id": tracker.run_id,
    }
