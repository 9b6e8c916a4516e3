"""The aidetect flows: stage order, caching and the review gate. No image math here."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

from prefect import flow, get_run_logger, unmapped
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.context import get_run_context
from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
from prefect.states import State
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner

from flows import review_gate
from pipeline_lib import tracking as tracking_lib
from pipeline_lib.config import DedupConfig, ExecutionConfig, IngestConfig, NormalizeConfig, PipelineConfig
from pipeline_lib.crawl import crawl_log_path
from pipeline_lib.imports import with_imports
from pipeline_lib.workspace import Ref, Workspace, digest_of, file_sha256, listing_digest, workspace_lock
from tasks import per_image, stages, track
from tasks.caching import cached

log = logging.getLogger(__name__)


class StageRecorder:
    """Runs stage tasks, keeps each one's final state name, and logs it to MLflow as it goes."""

    def __init__(self, workspace: Workspace, refresh: bool, tracker: tracking_lib.Tracker) -> None:
        self.workspace = workspace
        self.refresh = refresh
        self.tracker = tracker
        self.states: dict[str, str] = {}

    def run(self, name: str, task: Any, *args: Any, expiration: timedelta | None = None) -> Any:
        started = time.perf_counter()
        state: State = cached(task, self.workspace, self.refresh, expiration)(*args, return_state=True)
        return self.record(name, state, time.perf_counter() - started)

    def record(self, name: str, state: State, seconds: float) -> Any:
        """Keep a finished stage's state, log it on the parent run and as a nested run; its result (raise if failed)."""
        self.states[name] = state.name
        try:
            result = state.result()  # raises if the stage failed
        except BaseException:
            self._child(name, state.name, {}, seconds, failed=True)
            raise
        if isinstance(result, stages.StageResult):
            track.log_stage.fn(self.tracker, name, state.name, result.metrics, result.notes, result.table)
            if result.table:
                create_table_artifact(result.table, key=f"aidetect-{name}", description=f"{name}: per-source counts")
        else:
            track.log_stage.fn(self.tracker, name, state.name, {}, [], [])
        self._child(name, state.name, _numbers(getattr(result, "metrics", {})), seconds)
        return result

    def _child(self, name: str, state: str, metrics: dict[str, float], seconds: float, failed: bool = False) -> None:
        """The stage's nested MLflow run (a tracking failure is logged, never hides the stage's own outcome)."""
        try:
            tracking_lib.stage_run(self.tracker, name, state, metrics, seconds, failed=failed)
        except Exception as error:  # the tracking store may be down; the stage's result still counts
            log.warning("no nested MLflow run for stage %s: %s", name, error)


def _numbers(metrics: Any) -> dict[str, float]:
    """The numeric entries of a metrics mapping (anything else is left out)."""
    if not isinstance(metrics, dict):
        return {}
    return {str(k): float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def _per_image_stage(
    workspace: Workspace,
    refresh: bool,
    tasks: tuple[Any, Any, Any],
    source: Ref,
    params: tuple[Any, ...],
    chunk_size: int,
) -> State:
    """plan(root, source, *params, chunk_size) -> chunks; chunk(root, chunk, *params) mapped on the flow's task runner;
    merge(root, source, *params, results). The merge's state, or the failed plan's or chunk's (then no merge)."""
    plan_task, chunk_task, merge_task = tasks
    root = str(workspace.root)
    plan: State = cached(plan_task, workspace, refresh)(root, source, *params, chunk_size, return_state=True)
    if not plan.is_completed():
        return plan
    futures = []
    if chunks := plan.result():
        mapped = cached(chunk_task, workspace, refresh)
        futures = list(mapped.map(unmapped(root), chunks, *[unmapped(param) for param in params]))
    for future in futures:
        future.wait()
        if not future.state.is_completed():
            return future.state
    results = [future.result() for future in futures]
    return cached(merge_task, workspace, refresh)(root, source, *params, results, return_state=True)


def fingerprint_stage(workspace: Workspace, refresh: bool, catalog: Ref, dedup: DedupConfig, chunk_size: int) -> State:
    """Plan, hash the missing images in chunks, merge into the hash cache and a catalog snapshot."""
    tasks = (per_image.plan_fingerprint, per_image.hash_chunk, per_image.merge_fingerprints)
    return _per_image_stage(workspace, refresh, tasks, catalog, (dedup.algorithm, dedup.hash_size), chunk_size)


def preprocess_stage(
    workspace: Workspace, refresh: bool, catalog: Ref, size: int, policy: NormalizeConfig | None, chunk_size: int
) -> State:
    """Plan, decode the missing tensors in chunks, merge (count them, raise for images that failed)."""
    tasks = (per_image.plan_preprocess, per_image.tensor_chunk, per_image.merge_preprocess)
    return _per_image_stage(workspace, refresh, tasks, catalog, (size, policy), chunk_size)


def ingest_stage(workspace: Workspace, refresh: bool, crawl_log: Ref, config: IngestConfig, chunk_size: int) -> State:
    """Plan, validate the new files in chunks, merge (place files in store/ or quarantine/, snapshot the catalog)."""
    tasks = (per_image.plan_ingest, per_image.validate_chunk, per_image.merge_ingest)
    return _per_image_stage(workspace, refresh, tasks, crawl_log, (config,), chunk_size)


def make_task_runner(execution: ExecutionConfig) -> TaskRunner:
    """The task runner for mapped per-image tasks: threads, processes, or Dask (an existing cluster or a local one)."""
    if execution.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        if execution.dask_address:
            return DaskTaskRunner(address=execution.dask_address)
        cluster = {"n_workers": execution.max_workers or 2, "processes": True, "dashboard_address": None}
        return DaskTaskRunner(cluster_kwargs=cluster | {"host": "127.0.0.1"})
    if execution.task_runner == "processes":
        return ProcessPoolTaskRunner(max_workers=execution.max_workers)
    return ThreadPoolTaskRunner(max_workers=execution.max_workers)


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
    return pipeline_in_current_flow(config)


def pipeline_in_current_flow(config: PipelineConfig) -> dict[str, Any]:
    """The pipeline's stages inside the flow run that calls this (a deployment's own run, so its gate can suspend)."""
    started = time.perf_counter()
    tags = _flow_run_tags()
    with tracked_stages(config, tags["prefect.flow_run_name"] or "pipeline", tags) as (workspace, stages_run, tracker):
        with tracking_lib.system_metrics(tracker, config.tracking.system_metrics_interval_s):
            catalog = _data_stages(config, workspace, stages_run)
            summary = _model_stages(config, workspace, stages_run, tracker, catalog)
        summary |= {
            "states": stages_run.states,
            "seconds": round(time.perf_counter() - started, 2),
            "mlflow_run_id": tracker.run_id,
            "tracking_uri": tracker.uri,
            "workspace": str(workspace.root),
        }
        tracker.log_metrics({"pipeline.seconds": summary["seconds"]})
    _publish(summary, tracker)
    get_run_logger().info("stages: %s", ", ".join(f"{k}={v}" for k, v in stages_run.states.items()))
    return summary


def run_pipeline(config: PipelineConfig) -> dict[str, Any]:
    """Run the pipeline flow with the task runner config.execution asks for."""
    return pipeline.with_options(task_runner=make_task_runner(config.execution))(config)


@contextlib.contextmanager
def tracked_stages(
    config: PipelineConfig, run_name: str, tags: dict[str, str]
) -> Iterator[tuple[Workspace, StageRecorder, tracking_lib.Tracker]]:
    """What a flow's stages run in: the workspace (its writer lock held), Prefect results stored inside it, an
    MLflow run and a recorder.

    A second run on the same workspace fails at once with WorkspaceBusyError naming the holder. The MLflow run ends
    FINISHED with the block, FAILED when the block raises (a suspended review gate included); a run that a killed
    process left RUNNING is marked KILLED when the next one starts.
    """
    workspace = Workspace.create(config.execution.workspace)
    lock = workspace_lock(workspace, f"aidetect flow run {run_name}")
    with lock, temporary_settings({PREFECT_LOCAL_STORAGE_PATH: str(workspace.prefect / "results")}):
        tracker = track.start_tracking(str(workspace.root), config, run_name, tags)
        recorder = StageRecorder(workspace, config.execution.refresh_cache, tracker)
        try:
            yield workspace, recorder, tracker
        except BaseException:
            track.finish_tracking(tracker, "FAILED")
            raise
        track.finish_tracking(tracker, "FINISHED")


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
    started = time.perf_counter()
    state = ingest_stage(workspace, run.refresh, crawled.catalog, config.ingest, config.execution.chunk_size)
    return crawled, run.record("ingest", state, time.perf_counter() - started)


def fingerprint_and_dedup(
    config: PipelineConfig, workspace: Workspace, run: StageRecorder, ingested: stages.StageResult
) -> stages.StageResult:
    """Perceptual hashes (mapped over chunks), then exact and near-duplicate clusters."""
    started = time.perf_counter()
    state = fingerprint_stage(workspace, run.refresh, ingested.catalog, config.dedup, config.execution.chunk_size)
    hashed = run.record("fingerprint", state, time.perf_counter() - started)
    return run.run("dedup", stages.dedup, str(workspace.root), hashed.catalog, config.dedup)


def _data_stages(config: PipelineConfig, workspace: Workspace, run: StageRecorder) -> stages.StageResult:
    root = str(workspace.root)
    _, ingested = _crawl_and_ingest(config, workspace, run)
    deduped = fingerprint_and_dedup(config, workspace, run, ingested)
    approved = review_gate.review_stage(config, workspace, run, deduped)  # may pause/suspend for people
    reshuffle = config.execution.reshuffle_splits
    normalize = config.preprocess.normalize
    return run.run("split", stages.make_split, root, approved.catalog, config.split, reshuffle, config.audit, normalize)


def _model_stages(
    config: PipelineConfig,
    workspace: Workspace,
    run: StageRecorder,
    tracker: tracking_lib.Tracker,
    split: stages.StageResult,
) -> dict[str, Any]:
    root = str(workspace.root)
    track.log_datasets(root, tracker, split.catalog)
    normalize = config.preprocess.normalize
    started = time.perf_counter()
    size, chunk_size = config.train.image_size, config.execution.chunk_size
    state = preprocess_stage(workspace, run.refresh, split.catalog, size, normalize, chunk_size)
    run.record("preprocess", state, time.perf_counter() - started)
    trained = run.run("train", stages.train, root, split.catalog, config.train, normalize)
    track.log_training(tracker, trained)
    evaluate_args = (config.evaluate, config.calibration, normalize, config.report.cam_method)
    evaluation = run.run("evaluate", stages.evaluate, root, split.catalog, trained.model, *evaluate_args)
    title = f"aidetect — {config.train.model} on {split.catalog.path}"
    report_args = (config.report, title, normalize)
    report_ref = run.run("report", stages.make_report, root, trained.model, evaluation, *report_args)
    track.log_evaluation(root, tracker, evaluation, report_ref)
    test_digest = digest_of(split.catalog.digest, "test")[:16]
    registry_name = config.tracking.registered_model
    trust = config.tracking.trust_pickle
    registered = track.register(root, tracker, trained.model, evaluation, test_digest, registry_name, normalize, trust)
    return {
        "metrics": evaluation.metrics,
        "report": str(report_ref.resolve(workspace)),
        "model": str(trained.model.resolve(workspace)),
        "registry": registered,
        "notes": [*split.notes, *evaluation.notes],
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
    tags = _flow_run_tags(kind="crawl")
    with tracked_stages(config, f"crawl-{tags['prefect.flow_run_name']}", tags) as (workspace, run, tracker):
        crawled, ingested = _crawl_and_ingest(config, workspace, run)
    return {
        "states": run.states,
        "counts": crawled.metrics | ingested.metrics,
        "per_source": crawled.table,
        "catalog": ingested.catalog.path,
        "mlflow_run_id": tracker.run_id,
    }
