"""The aidetect flows: stage order, caching and the review gate. No image math here."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, unmapped
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.context import FlowRunContext, get_run_context
from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
from prefect.states import State
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner

from flows import review_gate
from pipeline_lib.acquire.crawl_log import crawl_log_path
from pipeline_lib.acquire.imports import with_imports
from pipeline_lib.assess import report_content
from pipeline_lib.assess.registry import alias_for
from pipeline_lib.assess.review_numbers import REVIEW_METRICS
from pipeline_lib.core import cachekey, cluster, code_index
from pipeline_lib.core.config import DedupConfig, ExecutionConfig, IngestConfig, NormalizeConfig, PipelineConfig
from pipeline_lib.core.tracking.runs import Tracker, code_version, system_metrics
from pipeline_lib.core.tracking.stage_runs import (
    KEY_PARAM_PREFIX,
    OUTPUT_TAG,
    EarlierStageRun,
    earlier_stage_runs,
    stage_run,
)
from pipeline_lib.core.workspace import Ref, Workspace, digest_of, file_sha256, workspace_lock
from pipeline_lib.curate import split as split_lib
from pipeline_lib.ops import caches
from pipeline_lib.ops.status import record_run
from tasks import per_image, stages, track
from tasks.caching import cached, stage_key
from tasks.progress import EpochReporter

log = logging.getLogger(__name__)

CODE_PARTS = "code-parts.json"  # in the workspace's cache: the code parts of stage keys (code_index.CodeIndex)


class StageRecorder:
    """Runs stage tasks, keeps each one's final state name, and logs it to MLflow as it goes (with its cache key).

    Every stage's state is a tag of the flow's MLflow run; a stage that ran (Completed or Failed) also gets a nested
    run from its real start to its real end, with its key's parts and its output's digest. A stage that runs every
    time (the crawl) and changed nothing (same key, same output as its previous nested run) gets none: its counts
    are on the flow's run. So a re-run where nothing is new stays one MLflow run.
    """

    def __init__(self, workspace: Workspace, refresh: bool, tracker: Tracker) -> None:
        self.workspace = workspace
        self.refresh = refresh
        self.tracker = tracker
        # parses the project's code once per flow run, or takes the parts a run before derived from the same files
        self.index = code_index.CodeIndex(remembered=workspace.cache / CODE_PARTS)
        self.states: dict[str, str] = {}
        self._earlier: dict[str, EarlierStageRun] | None = None  # stage -> its previous nested run
        self.outcome: dict[str, Any] = {}  # what the run's line in the workspace's runs list adds (accuracy, model)
        self.notes: list[str] = []  # the notes of every stage so far (the report's warnings come from them)
        self.metrics: dict[str, dict[str, float]] = {}  # stage -> its metrics (the report shows the review's)

    def run(self, name: str, task: Any, *args: Any, cache: bool = True, **live: Any) -> Any:
        """Run a stage task keyed by its stage key (cache=False: it runs every time); its result.

        live keyword arguments (e.g. where progress goes) are handed to the task but are not part of its key: their
        names are in cachekey.UNKEYED.
        """
        unkeyed = sorted(set(live) - cachekey.UNKEYED)
        if unkeyed:
            raise ValueError(f"live arguments {unkeyed} of stage {name} must be listed in cachekey.UNKEYED")
        started = time.perf_counter()
        key = stage_key(task, args, self.index)
        state: State = cached(task, self.workspace, self.refresh, self.index, cache)(*args, **live, return_state=True)
        return self.record(name, state, time.perf_counter() - started, key, every_time=not cache)

    def per_image(self, name: str, tasks: tuple[Any, Any, Any], source: Ref, params: tuple[Any, ...], chunk: int):
        """Run a per-image stage (plan, mapped chunks, merge); the stage's key is its plan's."""
        started = time.perf_counter()
        key = stage_key(tasks[0], (str(self.workspace.root), source, *params, chunk), self.index)
        state = _per_image_stage(self.workspace, self.refresh, tasks, source, params, chunk, self.index)
        return self.record(name, state, time.perf_counter() - started, key)

    def record(
        self, name: str, state: State, seconds: float, key: cachekey.StageKey | None = None, every_time: bool = False
    ) -> Any:
        """Keep a finished stage's state, log it on the parent run and as a nested run (with its key's parts when
        given; none for a stage that runs every_time and changed nothing); its result (raise if failed)."""
        self.states[name] = state.name
        try:
            result = state.result()  # raises if the stage failed
        except BaseException:
            self._child(name, state.name, {}, seconds, key, failed=True)
            raise
        if isinstance(result, stages.StageResult):
            self.notes += [note for note in result.notes if note not in self.notes]
            self.metrics[name] = _numbers(result.metrics)
            track.log_stage.fn(self.tracker, name, state.name, result.metrics, result.notes, result.table)
            if result.table:
                create_table_artifact(result.table, key=f"aidetect-{name}", description=f"{name}: per-source counts")
        else:
            track.log_stage.fn(self.tracker, name, state.name, {}, [], [])
        output = _output_digest(result)
        if every_time and self._unchanged(name, key, output):
            self.tracker.log_metrics({f"{name}.seconds": seconds})
            self.tracker.set_tags({f"aidetect.stage.{name}.unchanged": "true"})
            log.info("stage %s changed nothing (same key and output as its previous run): no nested run", name)
        elif state.name != "Cached":
            history = getattr(result, "history", ())
            metrics = _numbers(getattr(result, "metrics", {}))
            self._child(name, state.name, metrics, seconds, key, history=history, output=output)
        return result

    def _earlier_runs(self) -> dict[str, EarlierStageRun]:
        """Each stage's previous nested run in this workspace (one query per flow run)."""
        if self._earlier is None:
            self._earlier = earlier_stage_runs(self.tracker, str(self.workspace.root))
        return self._earlier

    def _unchanged(self, name: str, key: cachekey.StageKey | None, output: str) -> bool:
        """Whether the stage's key and output are those of its previous nested run (False when unknown)."""
        if key is None or not output:
            return False
        try:
            earlier = self._earlier_runs().get(name)
        except Exception as error:  # the tracking store may be down: record the stage as a nested run then
            log.warning("previous runs of stage %s not read: %s", name, error)
            return False
        return earlier is not None and earlier.output == output and earlier.key == cachekey.shown_parts(key)

    def _child(
        self,
        name: str,
        state: str,
        metrics: dict[str, float],
        seconds: float,
        key: cachekey.StageKey | None,
        failed: bool = False,
        history: Any = (),
        output: str = "",
    ) -> None:
        """The stage's nested MLflow run with its key's parts and what changed since the stage's previous run.

        A tracking failure is logged, never hides the stage's own outcome.
        """
        shown = cachekey.shown_parts(key or cachekey.StageKey({}))
        try:
            earlier = self._earlier_runs().get(name)
            changed = cachekey.changed_parts(shown, earlier.key if earlier else None)
            tags = {"aidetect.cache_key": key.digest if key else "", "aidetect.key_changed": changed}
            tags |= {OUTPUT_TAG: output} if output else {}
            tags["aidetect.workspace"] = str(self.workspace.root)
            params = {f"{KEY_PARAM_PREFIX}{part}": value for part, value in shown.items()}
            stage_run(self.tracker, name, state, metrics, seconds, failed, params, tags, history=history)
        except Exception as error:  # the tracking store may be down; the stage's result still counts
            log.warning("no nested MLflow run for stage %s: %s", name, error)
            return
        if state != "Cached":
            log.info("stage %s %s; key parts changed since its previous run: %s", name, state.lower(), changed)


def _without_inputs(policy: Any, names: Any) -> Any:
    """The cache policy with these task parameters left out of its key."""
    for name in names:
        policy = policy - name
    return policy


def _output_digest(result: Any) -> str:
    """The content digest of what a stage handed on: its Ref, or its catalog snapshot's ("" for anything else)."""
    ref = result if isinstance(result, Ref) else getattr(result, "catalog", None)
    return ref.digest if isinstance(ref, Ref) else ""


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
    index: code_index.CodeIndex | None = None,
) -> State:
    """plan(root, source, *params, chunk_size) -> chunks; chunk(root, chunk, *params) mapped on the flow's task runner;
    merge(root, source, *params, results). The merge's state, or the failed plan's or chunk's (then no merge)."""
    plan_task, chunk_task, merge_task = tasks
    root = str(workspace.root)
    index = index or code_index.CodeIndex()
    plan: State = cached(plan_task, workspace, refresh, index)(root, source, *params, chunk_size, return_state=True)
    if not plan.is_completed():
        return plan
    futures = []
    if chunks := plan.result():
        mapped = cached(chunk_task, workspace, refresh, index)
        futures = list(mapped.map(unmapped(root), chunks, *[unmapped(param) for param in params]))
    for future in futures:
        future.wait()
        if not future.state.is_final():  # the runner lost the task before it ran: raise the runner's own error
            future.result()
        if not future.state.is_completed():
            return future.state
    results = [future.result() for future in futures]
    return cached(merge_task, workspace, refresh, index)(root, source, *params, results, return_state=True)


FINGERPRINT_TASKS = (per_image.plan_fingerprint, per_image.hash_chunk, per_image.merge_fingerprints)
PREPROCESS_TASKS = (per_image.plan_preprocess, per_image.tensor_chunk, per_image.merge_preprocess)
INGEST_TASKS = (per_image.plan_ingest, per_image.validate_chunk, per_image.merge_ingest)


def fingerprint_stage(workspace: Workspace, refresh: bool, catalog: Ref, dedup: DedupConfig, chunk_size: int) -> State:
    """Plan, hash the missing images in chunks, merge into the hash cache and a catalog snapshot."""
    params = (dedup.algorithm, dedup.hash_size)
    return _per_image_stage(workspace, refresh, FINGERPRINT_TASKS, catalog, params, chunk_size)


def preprocess_stage(
    workspace: Workspace, refresh: bool, catalog: Ref, size: int, policy: NormalizeConfig | None, chunk_size: int
) -> State:
    """Plan, decode the missing tensors in chunks, merge (count them, raise for images that failed)."""
    return _per_image_stage(workspace, refresh, PREPROCESS_TASKS, catalog, (size, policy), chunk_size)


def ingest_stage(
    workspace: Workspace,
    refresh: bool,
    crawl_log: Ref,
    config: IngestConfig,
    chunk_size: int,
    hashing: tuple[str, int] | None = None,
) -> State:
    """Plan, validate (and hash, one decode) the new files in chunks, merge (place files in store/ or quarantine/,
    hashes into the fingerprint cache, snapshot the catalog)."""
    return _per_image_stage(workspace, refresh, INGEST_TASKS, crawl_log, (config, hashing), chunk_size)


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


@contextlib.contextmanager
def stage_task_runner(execution: ExecutionConfig, workspace: Workspace) -> Iterator[TaskRunner]:
    """Map the per-image tasks of this flow run on the task runner execution asks for, whatever runner the flow was
    started with (a deployment's flow runs on threads); an existing Dask cluster must first show that every worker
    sees the workspace (cluster.ClusterError if not). Only the mapped chunk tasks go to that runner: every other
    stage (plan, merge, dedup, split, train, ...) runs in the flow's own process."""
    if execution.task_runner == "dask" and execution.dask_address:
        cluster.check_workers_see(execution.dask_address, workspace.root)
    context = FlowRunContext.get()
    if context is None:
        raise RuntimeError("stage_task_runner needs a flow run")
    with make_task_runner(execution) as runner, context.model_copy(update={"task_runner": runner}):
        yield runner


def _flow_run_tags(kind: str = "pipeline") -> dict[str, str]:
    context = get_run_context()
    flow_run = getattr(context, "flow_run", None)
    return {
        "aidetect.kind": kind,
        "prefect.flow_run_id": str(getattr(flow_run, "id", "")),
        "prefect.flow_run_name": str(getattr(flow_run, "name", "")),
        "prefect.deployment_id": str(getattr(flow_run, "deployment_id", "") or ""),
        "mlflow.source.git.commit": code_version(),
    }


@flow(name="aidetect-pipeline")
def pipeline(config: PipelineConfig) -> dict[str, Any]:
    """Crawl, ingest, fingerprint, dedup, review, split, preprocess, train, evaluate and report."""
    return pipeline_in_current_flow(config)


def pipeline_in_current_flow(config: PipelineConfig) -> dict[str, Any]:
    """The pipeline's stages inside the flow run that calls this (a deployment's own run, so its gate can suspend)."""
    started = time.perf_counter()
    # Before the crawl: a weights download that fails (offline) stops the run now, not after the review.
    weights = stages.fetch_weights(config.train, str(config.execution.workspace), config.execution.refresh_cache)
    tags = _flow_run_tags()
    with tracked_stages(config, tags["prefect.flow_run_name"] or "pipeline", tags) as (workspace, stages_run, tracker):
        stages.remember_weights(workspace, config.train, weights)  # the first run's check, made before it existed
        with system_metrics(tracker, config.tracking.system_metrics_interval_s):
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
    """Run the pipeline flow; its per-image tasks map on the task runner config.execution asks for."""
    return pipeline(config)


@contextlib.contextmanager
def tracked_stages(
    config: PipelineConfig, run_name: str, tags: dict[str, str]
) -> Iterator[tuple[Workspace, StageRecorder, Tracker]]:
    """What a flow's stages run in: the workspace (its writer lock held), Prefect results stored inside it, the task
    runner of config.execution for the per-image chunks (stage_task_runner), an MLflow run and a recorder.

    A second run on the same workspace fails at once with WorkspaceBusyError naming the holder. The MLflow run ends
    FINISHED with the block, FAILED when the block raises (a suspended review gate included); a run that a killed
    process left RUNNING is marked KILLED when the next one starts.
    """
    workspace = Workspace.create(config.execution.workspace)
    started = time.time()
    lock = workspace_lock(workspace, f"aidetect flow run {run_name}")
    settings = temporary_settings({PREFECT_LOCAL_STORAGE_PATH: str(workspace.prefect / "results")})
    with lock, settings, stage_task_runner(config.execution, workspace):
        tracker = track.start_tracking(str(workspace.root), config, run_name, tags)
        recorder = StageRecorder(workspace, config.execution.refresh_cache, tracker)
        try:
            yield workspace, recorder, tracker
        except BaseException:
            track.finish_tracking(tracker, "FAILED")
            _record_run(workspace, tracker, tags, "FAILED", started, recorder)
            raise
        track.finish_tracking(tracker, "FINISHED")
        _record_run(workspace, tracker, tags, "FINISHED", started, recorder)


def _record_run(
    workspace: Workspace, tracker: Tracker, tags: dict[str, str], status: str, started: float, run: Any
) -> None:
    """The run's line in the workspace's runs list (what `aidetect status` shows without opening MLflow)."""
    entry = {
        "run_id": tracker.run_id,
        "kind": tags.get("aidetect.kind", ""),
        "status": status,
        "started": datetime.fromtimestamp(started, UTC).isoformat(timespec="seconds"),
        "seconds": round(time.time() - started, 1),
        "states": run.states,
        **run.outcome,
    }
    try:
        record_run(workspace, entry)
    except OSError as error:
        log.warning("run %s not added to %s: %s", tracker.run_id, workspace.root, error)


def _crawl_and_ingest(
    config: PipelineConfig, workspace: Workspace, run: StageRecorder
) -> tuple[stages.StageResult, stages.StageResult]:
    """Crawl the configured sources plus the workspace's imported folders (every time it is asked), then ingest.

    The crawl log decides what is fetched again: a keyword searched within sources.recrawl_after_hours is not
    searched again (with --refresh-cache it is), a URL fetched once never again, a local file only when new or changed.
    With --refresh-cache the per-image caches of the data stages are made again (validation records, hashes, ...).
    """
    root = str(workspace.root)
    if run.refresh:
        caches.drop_caches(workspace, caches.data_caches(workspace, config))
    sources = with_imports(config.sources, workspace)
    if config.execution.crawl:
        if run.refresh:
            sources = sources.model_copy(update={"recrawl_after_hours": 0.0})
        crawled = run.run("crawl", stages.crawl_sources, root, sources, cache=False)
    else:
        log_file = crawl_log_path(workspace)
        digest = file_sha256(log_file) if log_file.is_file() else ""
        crawled = run.run("crawl", stages.current_crawl_log, root, digest)
    hashing = (config.dedup.algorithm, config.dedup.hash_size)  # ingest's decode fills the fingerprint cache
    params = (config.ingest, hashing)
    ingested = run.per_image("ingest", INGEST_TASKS, crawled.catalog, params, config.execution.chunk_size)
    return crawled, ingested


def fingerprint_and_dedup(
    config: PipelineConfig, workspace: Workspace, run: StageRecorder, ingested: stages.StageResult
) -> stages.StageResult:
    """Perceptual hashes (mapped over chunks), then exact and near-duplicate clusters."""
    params = (config.dedup.algorithm, config.dedup.hash_size)
    hashed = run.per_image("fingerprint", FINGERPRINT_TASKS, ingested.catalog, params, config.execution.chunk_size)
    return run.run("dedup", stages.dedup, str(workspace.root), hashed.catalog, config.dedup)


def _data_stages(config: PipelineConfig, workspace: Workspace, run: StageRecorder) -> stages.StageResult:
    root = str(workspace.root)
    _, ingested = _crawl_and_ingest(config, workspace, run)
    deduped = fingerprint_and_dedup(config, workspace, run, ingested)
    approved = review_gate.review_stage(config, workspace, run, deduped)  # may pause/suspend for people
    version = split_lib.registry_version_for(workspace, config.execution.reshuffle_splits)  # what --reshuffle asks
    normalize = config.preprocess.normalize
    return run.run("split", stages.make_split, root, approved.catalog, config.split, version, config.audit, normalize)


def _check_trainable(config: PipelineConfig, workspace: Workspace, split: stages.StageResult) -> None:
    """SplitError naming a label with too few groups in train, val or test, and how to add images; before training."""
    ratios = {"train": config.split.train, "val": config.split.val, "test": config.split.test}
    shortfalls = split_lib.label_shortfalls(split.table, ratios, config.split.min_groups_per_label)
    if shortfalls:
        folders: dict[str, list[Path]] = {}
        for source in with_imports(config.sources, workspace).folders:
            folders.setdefault(source.label, []).append(Path(source.path))
        raise split_lib.SplitError(split_lib.shortfall_message(shortfalls, folders, workspace.root))


def _model_stages(
    config: PipelineConfig,
    workspace: Workspace,
    run: StageRecorder,
    tracker: Tracker,
    split: stages.StageResult,
) -> dict[str, Any]:
    root = str(workspace.root)
    _check_trainable(config, workspace, split)
    track.log_datasets(root, tracker, split.catalog)
    normalize = config.preprocess.normalize
    size, chunk_size = config.train.image_size, config.execution.chunk_size
    if run.refresh:  # every tensor is decoded again by the code now
        caches.drop_caches(workspace, caches.model_caches(workspace, config))
    run.per_image("preprocess", PREPROCESS_TASKS, split.catalog, (size, normalize), chunk_size)
    trainset = split.trainset or split.catalog
    reporter = EpochReporter(tracker, config.train.max_epochs)  # live: a line and MLflow metrics as each epoch ends
    trained = run.run(
        "train", stages.train, root, trainset, config.train, normalize, not run.refresh, progress=reporter
    )
    track.log_training(tracker, trained, logged_live=run.states["train"] != "Cached", root=root)
    device = config.train.device  # every model stage runs where training did
    evaluate_args = (config.evaluate, config.calibration, normalize, config.report.cam_method, device)
    evaluation = run.run("evaluate", stages.evaluate, root, split.catalog, trained.model, *evaluate_args)
    data_version = Path(split.catalog.path).stem
    title = f"aidetect — {config.train.model}, data {data_version}"
    notes = [*run.notes, *evaluation.notes]
    # The audit's verdict is part of the report's key (the split decides it); crawl health describes the crawl that
    # ran now and is handed over live, so that a crawl that fetched nothing new leaves the report cached.
    keyed, health = report_content.split_warning_notes(run.notes)
    held_out = config.split.leave_out_generator
    reviewed = {k: v for k, v in run.metrics.get("review", {}).items() if k in REVIEW_METRICS}
    report_args = (config.report, title, normalize, device, keyed, trained.history, data_version, held_out, reviewed)
    report_ref = run.run(
        "report", stages.make_report, root, trained.model, evaluation, *report_args, health_notes=health
    )
    track.log_evaluation(root, tracker, evaluation, report_ref)
    test_digest = digest_of(split.catalog.digest, "test")[:16]
    registry_name = config.tracking.registered_model
    alias = alias_for(config.split.leave_out_generator)
    registered = track.register(
        root,
        tracker,
        trained.model,
        evaluation,
        test_digest,
        registry_name,
        normalize,
        alias=alias,
        promote=config.execution.promote,
        device=device,
        trust_pickle=config.tracking.trust_pickle,
    )
    holds = registered.get("promoted") or alias in registered.get("aliases", [])
    run.outcome |= {
        "test_accuracy": evaluation.metrics.get("accuracy"),
        "model": f"{registry_name} v{registered.get('version')}" + (f" {alias}" if holds else ""),
    }
    return {
        "registered_model": registry_name,
        "data_version": data_version,
        "metrics": evaluation.metrics,
        "report": str(report_ref.resolve(workspace)),
        "model": str(trained.model.resolve(workspace)),
        "registry": registered,
        "notes": [*split.notes, *evaluation.notes],
        "warnings": report_content.report_warnings(notes, evaluation.metrics, config.report.data_note),
    }


def _publish(summary: dict[str, Any], tracker: Tracker) -> None:
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
    link, text = tracker.ui_link()
    create_link_artifact(link, link_text=text, key="aidetect-mlflow-run")


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
