"""Prefect tasks: thin adapters that call pipeline_lib, write into the workspace and return small references."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from pipeline_lib.acquire import crawl as crawl_lib
from pipeline_lib.acquire import recovery
from pipeline_lib.acquire.crawl_log import read_crawl_log
from pipeline_lib.assess import health, report_content
from pipeline_lib.core import catalog as cat
from pipeline_lib.core.config import (
    AuditConfig,
    CalibrationConfig,
    DedupConfig,
    EvaluateConfig,
    GeneralizationConfig,
    NormalizeConfig,
    ReportConfig,
    ReviewConfig,
    SourcesConfig,
    SplitConfig,
    TrackingConfig,
    TrainConfig,
)
from pipeline_lib.core.workspace import Ref, Workspace, WorkspaceError
from pipeline_lib.curate import dedup as dedup_lib
from pipeline_lib.curate import review, review_pack, split
from pipeline_lib.learn import initial_weights, preprocess
from pipeline_lib.learn.history import EpochStats
from pipeline_lib.learn.normalize import policy_key
from tasks.caching import current_stage_key

# The model stages' modules (torch, torchvision, scikit-learn, Grad-CAM, matplotlib: seconds to import) are imported
# where they are used: a run whose model stages are cached never needs them. The stage keys see these imports as
# they see the module's own (code_index follows the imports inside a definition).
log = logging.getLogger(__name__)

CAM_SUMMARY_LIMIT = 512  # test images whose CAMs the attention summary covers (the first ones by sha256)


@dataclass(frozen=True)
class StageResult:
    """What a catalog stage hands on: the snapshot reference and a few numbers."""

    catalog: Ref
    metrics: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    table: list[dict[str, Any]] = field(default_factory=list)
    trainset: Ref | None = None  # split only: split.training_set, the content the train stage is keyed on


@dataclass(frozen=True)
class TrainOutput:
    model: Ref
    history: list[dict[str, Any]]
    best_epoch: int
    stopped_early: bool
    weights_name: str
    weights_sha256: str
    device: str
    resumed_from_epoch: int | None = None  # the epoch of last.pt training continued after; None: from epoch 0
    balance: dict[str, float] = field(default_factory=dict)  # learn.datasets.ClassBalance.metrics()
    precision: str = ""
    augment_on: str = ""
    mode: str = "finetune"  # train.mode resolved: finetune | probe
    features: dict[str, float] = field(default_factory=dict)  # probe: feature vectors computed / reused
    seconds: float = 0.0  # wall time of training (a probe's embedding of new images included)


@dataclass(frozen=True)
class EvalOutput:
    predictions: Ref
    metrics: dict[str, float]
    plots: dict[str, str]
    worst_groups: list[dict[str, Any]]
    temperature: float = 1.0  # fitted on the validation split (1.0: no temperature scaling)
    generators: list[dict[str, Any]] = field(default_factory=list)  # stats.per_generator_metrics rows
    calibration_file: str = ""  # <model>.calibration.json beside the checkpoint (workspace-relative)
    notes: list[str] = field(default_factory=list)


def _active(policy: NormalizeConfig | None) -> NormalizeConfig | None:
    """The normalisation policy when it re-encodes, else None (the plain tensor cache)."""
    return policy if policy is not None and policy.mode != "none" else None


@task(name="crawl")
def crawl_sources(root: str, sources: SourcesConfig) -> StageResult:
    """Fetch new files from every source into incoming/ and snapshot the crawl log (keywords searched within
    sources.recrawl_after_hours are not searched again)."""
    workspace = Workspace.create(root)
    result = crawl_lib.crawl_sources(workspace, sources)
    summary, crawl_log, fallback_notes = _crawl_fallbacks(workspace, sources, result)
    recovered = recovery.restore_missing(workspace, crawl_log, sources)  # files deleted since they were fetched
    log_ref = cat.write_table(workspace, "crawl", "log", crawl_log)
    totals = summary[["new", "skipped", "failed"]].sum()
    metrics = {f"crawl.{k}": float(v) for k, v in totals.items()}
    metrics["crawl.keywords_not_due"] = float(len(result.not_due))
    notes = [f"{r.source} {r.keyword!r}: {r.error}" for r in summary.itertuples() if r.error]
    if result.not_due:
        notes.append(
            f"{len(result.not_due)} keyword(s) searched less than sources.recrawl_after_hours="
            f"{sources.recrawl_after_hours:g} h ago were not searched again"
        )
    keywords = health.keyword_health(summary)
    flagged = health.flagged(keywords)
    notes += [f"crawl health: {r.source} {r.keyword!r} {r.flag}: {r.message}" for r in flagged.itertuples()]
    notes += fallback_notes + recovered.notes()
    metrics |= {"crawl.restored": float(len(recovered.restored)), "crawl.lost": float(len(recovered.lost))}
    metrics |= health.engine_counts(summary) | health.keyword_counts(summary)
    metrics["crawl.flagged_keywords"] = float(len(flagged))
    rows = summary.to_dict("records")
    table = [{k: (v if isinstance(v, str) else int(v)) for k, v in row.items()} for row in rows]
    return StageResult(log_ref, metrics, notes, table)


def _crawl_fallbacks(
    workspace: Workspace, sources: SourcesConfig, result: crawl_lib.CrawlResult
) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """Crawl keywords that returned nothing once more on their source's fallback_engine; merged summary and log."""
    fallbacks = health.fallback_plan(health.keyword_health(result.summary), sources)
    if not fallbacks:
        return result.summary, result.log, []
    retry = sources.model_copy(update={"search": [f.source for f in fallbacks], "urls": [], "folders": []})
    again = crawl_lib.crawl_sources(workspace, retry)
    notes = [fallback.describe() for fallback in fallbacks]
    merged = pd.concat([result.summary, again.summary], ignore_index=True)
    return merged, again.log, notes  # the crawl log is cumulative: the second one holds both runs' rows


@task(name="crawl-log")
def current_crawl_log(root: str, log_digest: str) -> StageResult:
    """Snapshot the crawl log as it stands (no crawling): what `retrain` starts from."""
    workspace = Workspace.create(root)
    table = read_crawl_log(workspace)
    if table.empty:
        raise ValueError(f"nothing crawled yet in {workspace.root}: run `aidetect crawl` or `aidetect run`")
    return StageResult(cat.write_table(workspace, "crawl", "log", table), {"crawl.logged": float(len(table))})


@task(name="dedup")
def dedup(root: str, catalog: Ref, config: DedupConfig) -> StageResult:
    """Exact and near-duplicate clusters; one keeper per cluster."""
    workspace = Workspace.create(root)
    result = dedup_lib.find_duplicates(cat.read_snapshot(workspace, catalog), config.threshold)
    metrics = {"dedup.exact": result.n_exact, "dedup.near": result.n_near, "dedup.clusters": result.n_clusters}
    notes = [f"cross-group cluster: {', '.join(groups)}" for groups in result.cross_group_clusters]
    return StageResult(cat.write_snapshot(workspace, "dedup", result.catalog), metrics, notes)


@dataclass(frozen=True)
class QueueResult(StageResult):
    """The review queue (catalog: its table, most suspect first), the reviewer name of the model that scored it
    ("" when none did) and why none did."""

    scorer: str = ""
    why_no_model: str = ""


@task(name="review-queue")
def review_queue(
    root: str, catalog: Ref, decisions_digest: str, config: ReviewConfig, tracking: TrackingConfig, device: str = "cpu"
) -> QueueResult:
    """Score every undecided image (suspicion, reasons, suggestion) with the champion, else the newest trained model
    of the workspace (features cached per image and model), and the near-duplicate, face and tiny hints."""
    from pipeline_lib.assess import review_queue as queue_lib
    from pipeline_lib.core.tracking.store import tracking_uri

    workspace = Workspace.create(root)
    settings = queue_lib.QueueSettings(tiny_side=config.tiny_side, device=device)
    uri = tracking_uri(tracking.uri, workspace)
    table = cat.read_snapshot(workspace, catalog)
    queue = queue_lib.score_queue(workspace, table, uri, tracking.registered_model, settings, tracking.trust_pickle)
    metrics = {"review.features_computed": float(queue.computed), "review.features_reused": float(queue.reused)}
    notes = [f"review queue without a model: {queue.note}"] if queue.note else []
    ref = cat.write_table(workspace, "review", "queue", queue.rows)
    return QueueResult(ref, metrics, notes, scorer=queue.scorer, why_no_model=queue.note)


@task(name="review-gate")
def review_gate(
    root: str, catalog: Ref, decisions_digest: str, config: ReviewConfig, queue: Ref | None = None
) -> StageResult:
    """Apply human decisions; in require and assisted mode write the review pack and stop while images are pending.

    In auto and off mode nobody looks at a pack, so none is built (`aidetect review pack` builds one on request).
    queue: the review queue of this run (its counts become the gate's metrics).
    """
    workspace = Workspace.create(root)
    table = cat.read_snapshot(workspace, catalog)
    decisions = review.read_decisions(workspace)
    outcome = review.apply_decisions(table, decisions, config.mode)
    if config.mode in ("require", "assisted"):
        review_pack.write_review_pack(workspace, outcome.catalog, config.thumbnail_size, config.tiny_side)
    if outcome.pending:
        raise review.ReviewPending(review.pending_message(outcome.pending, workspace))
    scores = cat.read_table(workspace, queue)["suspicion"] if queue is not None else pd.Series([], dtype=float)
    numbers = review.model_numbers(decisions, set(table.loc[table["status"] == cat.STATUS_OK, "sha256"]))
    metrics = {
        "review.approved": outcome.approved,
        "review.rejected": outcome.rejected,
        "review.auto_approved": outcome.auto_approved,
        "review.pending": len(scores),
        "review.suspects_shown": int((scores >= config.suspicion_threshold).sum()),
        "review.approved_by_model": numbers["approved_by_model"],
        "review.model_suspects_overturned": numbers["model_suspects_overturned"],
    }
    return StageResult(cat.write_snapshot(workspace, "review", outcome.catalog), metrics)


@task(name="split")
def make_split(
    root: str,
    catalog: Ref,
    config: SplitConfig,
    registry_version: int = 1,
    audit: AuditConfig | None = None,
    normalize: NormalizeConfig | None = None,
) -> StageResult:
    """Sticky, group-aware, stratified train/val/test assignment, then the format-shortcut audit (config audit).

    The audit fits a metadata-only model on the training split (on the normalised files when
    preprocess.normalize re-encodes them); above audit.warn_above it warns, or fails in strict mode.
    With split.leave_out_generator, that generator's units go to test after assignment (leave-one-generator-out);
    the sticky registry is not updated for them: the assignment is a per-run view. registry_version above the
    workspace's current version starts that new version (--reshuffle; split.registry_version_for).
    """
    workspace = Workspace.create(root)
    ratios = {"train": config.train, "val": config.val, "test": config.test}
    reshuffle = registry_version > split.registry_version_for(workspace, reshuffle=False)
    state = split.prepare_registry(workspace, ratios, config.seed, reshuffle)
    table = cat.read_snapshot(workspace, catalog)
    plan = split.assign_splits(table, ratios, config.seed, state.registry, state.version)
    assigned, left_out = plan.catalog, config.leave_out_generator
    if left_out:
        assigned = split.leave_generator_out(assigned, left_out)
    split.check_no_leak(assigned)
    split.write_registry(workspace, plan.registry)
    split.write_registry_meta(workspace, state.version, ratios, config.seed)
    table, warnings = split.split_report(assigned, ratios, config.min_groups_per_label)
    metrics = {f"split.{r.split}.{r.label}.images": float(r.images) for r in table.itertuples()}
    metrics |= {f"split.{r.split}.{r.label}.groups": float(r.groups) for r in table.itertuples()}
    metrics |= {"split.registry_version": float(state.version), "split.new_groups": float(plan.new_groups)}
    metrics["split.generators"] = float(len(split.known_generators(assigned)))  # the generalization stage's gate
    ratios = split.class_ratios(table)
    metrics |= {f"split.{r.split}.real_per_ai": float(r.real_per_ai) for r in ratios.itertuples()}
    largest = split.largest_groups(assigned)
    biggest = ", ".join(f"{g['group']} ({g['images']} {g['label']}, {g['split']})" for g in largest)
    notes = [*warnings, *([state.note] if state.note else []), split.describe_ratios(ratios)]
    notes.append(f"largest groups: {biggest}")
    if left_out:
        n_left_out = split.left_out_images(assigned, left_out)
        metrics["split.left_out_generator_images"] = float(n_left_out)
        notes.append(f"leave-one-generator-out: {left_out} ({n_left_out} images) only in test")
    if audit is not None and audit.enabled:
        audit_metrics, audit_note = shortcut_audit(workspace, assigned, audit, normalize, config.seed)
        metrics |= audit_metrics
        notes.append(audit_note)
    rows = [{k: (v if isinstance(v, str) else float(v)) for k, v in row.items()} for row in table.to_dict("records")]
    trainset = cat.write_table(workspace, "catalog", "trainset", split.training_set(assigned))
    return StageResult(cat.write_snapshot(workspace, "split", assigned), metrics, notes, rows, trainset)


def _audit_rows(table: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The training split's usable rows, or all assigned usable rows when train has < 2 images of a label."""
    from pipeline_lib.curate import audit as audit_lib

    usable = table[(table["status"] == cat.STATUS_OK) & (table["split"].fillna("") != "")].drop_duplicates("sha256")
    train_rows = usable[usable["split"] == "train"]
    counts = train_rows["label"].value_counts()
    if all(counts.get(label, 0) >= audit_lib.MIN_PER_CLASS for label in ("real", "ai")):
        return train_rows, "train split"
    return usable, "all splits (the train split has too few images per label)"


def shortcut_audit(
    workspace: Workspace, table: pd.DataFrame, config: AuditConfig, normalize: NormalizeConfig | None, seed: int
) -> tuple[dict[str, float], str]:
    """(audit.* metrics, a note with the verdict); AuditError naming the AUC and top features in strict mode."""
    from pipeline_lib.curate import audit as audit_lib

    rows, scope = _audit_rows(table)
    features = preprocess.audit_features(workspace, rows, normalize)
    result = audit_lib.audit_shortcuts(features, rows["label"].astype(str).to_numpy(), seed=seed)
    active = _active(normalize)
    verdict, message = audit_lib.audit_verdict(result, config.warn_above, config.strict, normalized=bool(active))
    seen = f"normalised files ({policy_key(active)})" if active else "stored files"
    note = f"format-shortcut audit [{verdict}] on the {scope}, {seen}: {message}"
    if verdict == "fail":
        fix = (
            "Fix: set preprocess.normalize.mode=jpeg (optionally resize_shorter and crop_square) so both classes "
            "are re-encoded alike"
            if active is None
            else "Normalisation is on, yet metadata still predicts the label: add preprocess.normalize.resize_shorter "
            "and crop_square, or a random quality range (quality_min/quality_max)"
        )
        raise audit_lib.AuditError(
            f"{note}. A detector would learn the file instead of the image. {fix}, or collect real and AI images "
            "in the same formats and sizes; audit.strict=false only warns."
        )
    if verdict == "warn":
        log.warning(note)
    metrics = result.metrics() | {"audit.flagged": float(verdict != "ok")}
    return metrics, note


@task(name="weights", cache_policy=NO_CACHE)
def fetch_weights(config: TrainConfig, root: str | None = None, refresh: bool = False) -> str:
    """Before the first stage: the backbone can be built and the initial weights train.weights names are on disk,
    published ones downloaded (hash-checked) if missing; the file's path ("" for none). Fails naming the file, URL
    and command offline, or the extra to install for a foundation backbone.

    In the existing workspace at root the answer is remembered while the file is unchanged (learn.initial_weights:
    the check imports torch), unless refresh (--refresh-cache: checked again)."""

    def check() -> Path | None:
        from pipeline_lib.learn import models

        return models.ensure_initial_weights(
            config.model, config.weights, config.weights_url, image_size=config.image_size
        )

    workspace = None if refresh or root is None else _existing_workspace(root)
    path = initial_weights.checked_weights(workspace, _weights_question(config), check)
    return "" if path is None else str(path)


def remember_weights(workspace: Workspace, config: TrainConfig, found: str) -> None:
    """Keep fetch_weights' answer (found: "" for no file) in the workspace, for a check made before it existed."""
    initial_weights.remember(workspace, _weights_question(config), Path(found) if found else None)


def _weights_question(config: TrainConfig) -> tuple[str, ...]:
    return config.model, config.weights, config.weights_url or "", str(config.image_size)


def _existing_workspace(root: str) -> Workspace | None:
    """The workspace at root, or None when there is none yet (nothing is created before the flow locks it)."""
    try:
        return Workspace.open(root)
    except WorkspaceError:
        return None


@task(name="train")
def train(
    root: str,
    trainset: Ref,
    config: TrainConfig,
    normalize: NormalizeConfig | None = None,
    resume: bool = True,
    progress: Callable[[EpochStats], None] | None = None,
) -> TrainOutput:
    """Fine-tune the classifier in models/<stage key>/ (split.training_set in, so only content keys it).

    resume: continue from that folder's last.pt (a run of the same key that was interrupted); False (--refresh-cache)
    trains from epoch 0. progress: called as each epoch ends (tasks.progress.EpochReporter: a console line and the
    epoch's metrics in MLflow); live, not in the key, so the code that reports is not the code that trains.
    """
    from pipeline_lib.learn.train import train_model

    workspace = Workspace.create(root)
    active = _active(normalize)
    out_dir = workspace.models / current_stage_key()[:16]
    table = cat.read_table(workspace, trainset)
    started = time.perf_counter()
    result = train_model(
        workspace, table, config, out_dir, on_epoch=progress, policy=active, resume=resume
    )
    history = [vars(epoch) | {} for epoch in result.history]
    return TrainOutput(
        model=workspace.ref(result.best_path),
        history=history,
        best_epoch=result.best_epoch,
        stopped_early=result.stopped_early,
        weights_name=result.weights.name,
        weights_sha256=result.weights.sha256,
        device=result.device,
        resumed_from_epoch=result.resumed_from_epoch,
        balance=result.balance,
        precision=result.precision,
        augment_on=result.augment_on,
        mode=result.mode,
        features=result.features,
        seconds=round(time.perf_counter() - started, 3),
    )


def _split_rows(table: pd.DataFrame, name: str) -> pd.DataFrame:
    rows = table[(table["status"] == cat.STATUS_OK) & (table["split"] == name)].drop_duplicates("sha256")
    return rows.sort_values("sha256").reset_index(drop=True)


def _test_rows(workspace: Workspace, catalog: Ref) -> pd.DataFrame:
    return _split_rows(cat.read_snapshot(workspace, catalog), "test")


def fit_calibration(
    workspace: Workspace,
    model: Any,
    val_rows: pd.DataFrame,
    size: int,
    config: CalibrationConfig,
    normalize: NormalizeConfig | None,
    device: str = "cpu",
) -> tuple[float, dict[str, float], list[str]]:
    """(temperature fitted on the validation split's logits, calibration.* metrics, notes); T = 1 when off, when
    the split is too small or one-class, or when the fit lands outside calibration.TEMPERATURE_RANGE."""
    from pipeline_lib.assess import calibration as calibration_lib
    from pipeline_lib.assess import evaluate as evaluate_lib

    if not config.temperature_scaling:
        return 1.0, {"calibration.temperature": 1.0}, ["temperature scaling off (calibration.temperature_scaling)"]
    if val_rows.empty:
        return 1.0, {"calibration.temperature": 1.0}, ["temperature scaling skipped: the validation split is empty"]
    logits = evaluate_lib.stored_logits(workspace, model, val_rows["sha256"].tolist(), size, _active(normalize), device)
    labels = val_rows["label"].astype(str).to_numpy()
    fit = calibration_lib.fit_bounded_temperature(logits, labels, config.min_val_images)
    temperature = fit.temperature
    raw = calibration_lib.expected_calibration_error(evaluate_lib.softmax_p_ai(logits), labels)
    fitted = calibration_lib.expected_calibration_error(calibration_lib.apply_temperature(logits, temperature), labels)
    metrics = {
        "calibration.temperature": temperature,
        "calibration.fitted": float(not fit.reason),
        "calibration.val_n": float(len(val_rows)),
        "calibration.val_ece_raw": raw,
        "calibration.val_ece": fitted,
    }
    if fit.reason:
        return temperature, metrics, [f"temperature scaling skipped, T=1: {fit.reason}"]
    return temperature, metrics, [f"temperature scaling: T={temperature:.3f} on {len(val_rows)} validation images"]


def _plots(workspace: Workspace, predictions: pd.DataFrame, out_dir: Any) -> dict[str, str]:
    from pipeline_lib.assess import plots as plots_lib

    plots = {}
    for name, plot in (
        ("confusion_matrix", plots_lib.plot_confusion_matrix),
        ("roc", plots_lib.plot_roc),
        ("pr", plots_lib.plot_pr),
        ("reliability", plots_lib.plot_reliability),
    ):
        plot(predictions, out_dir / f"{name}.png")
        plots[name] = workspace.relative(out_dir / f"{name}.png")
    return plots


@task(name="evaluate")
def evaluate(
    root: str,
    catalog: Ref,
    model_ref: Ref,
    config: EvaluateConfig,
    calibration: CalibrationConfig | None = None,
    normalize: NormalizeConfig | None = None,
    cam_method: str = "gradcam",
    device: str = "cpu",
) -> EvalOutput:
    """Score the test split on device (train.device): metrics (Wilson and bootstrap CIs, robustness, per generator,
    calibration, CAM attention), the predictions table (p_ai calibrated, p_ai_raw), plots, <model>.calibration.json."""
    from pipeline_lib.assess import calibration as calibration_lib
    from pipeline_lib.assess import cam
    from pipeline_lib.assess import evaluate as evaluate_lib
    from pipeline_lib.assess import predict as predict_lib
    from pipeline_lib.core import devices
    from pipeline_lib.learn import models

    workspace = Workspace.create(root)
    model_path = model_ref.resolve(workspace)
    model, meta = models.load_model(model_path)
    device = devices.resolve_device(device)
    model.to(device)  # once: every pass below borrows it there
    size, active = int(meta["image_size"]), _active(normalize)
    table = cat.read_snapshot(workspace, catalog)
    rows = _split_rows(table, "test")
    temperature, calibration_metrics, notes = fit_calibration(
        workspace, model, _split_rows(table, "val"), size, calibration or CalibrationConfig(), normalize, device
    )
    logits = evaluate_lib.stored_logits(workspace, model, rows["sha256"].tolist(), size, active, device)
    p_raw = evaluate_lib.softmax_p_ai(logits)
    p_ai = calibration_lib.apply_temperature(logits, temperature) if len(rows) else p_raw
    predictions = evaluate_lib.predictions_table(rows, p_ai, config.threshold, p_ai_raw=p_raw)
    out_dir = workspace.reports / current_stage_key()[:16]  # one folder per key: a cached result's files stay put
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = _plots(workspace, predictions, out_dir)
    predictions_path = out_dir / "predictions.parquet"
    predictions.to_parquet(predictions_path, index=False)
    metrics = evaluate_lib.compute_metrics(predictions, config.threshold, config.bootstrap)
    y_true = (rows["label"].astype(str) == evaluate_lib.POSITIVE).to_numpy(dtype=np.int64)
    metrics["ece_raw"] = evaluate_lib.expected_calibration_error(y_true, p_raw)
    metrics |= calibration_metrics
    labels, shas = rows["label"].astype(str).to_numpy(), rows["sha256"].tolist()

    def degraded(variant: str) -> Any:  # the original files degraded, then preprocessed as for training
        return preprocess.degraded_tensors(workspace, shas, size, variant, active)

    metrics |= evaluate_lib.robustness_metrics(
        model, degraded, labels, config.threshold, temperature=temperature, device=device
    )
    generator_metrics, generators = evaluate_lib.generator_metrics(predictions, config.threshold)
    metrics |= generator_metrics
    subset = preprocess.load_tensors(workspace, shas[:CAM_SUMMARY_LIMIT], size, active)
    layer, reshape = models.target_layer(model), models.cam_reshape(model)
    metrics |= cam.cam_attention_metrics(model, subset, layer, cam_method, device=device, reshape_transform=reshape)
    notes += report_content.cam_warnings(metrics)
    written = predict_lib.write_calibration(
        model_path,
        predict_lib.ModelCalibration(
            temperature, active, {"ece_raw": metrics["ece_raw"], "ece": metrics["ece"], "fitted_on": "val"}
        ),
    )
    worst = evaluate_lib.per_group_accuracy(predictions).head(10).to_dict("records")
    return EvalOutput(
        workspace.ref(predictions_path),
        metrics,
        plots,
        worst,
        temperature=temperature,
        generators=generators.to_dict("records"),
        calibration_file=workspace.relative(written),
        notes=notes,
    )


@task(name="generalization")
def generalization(
    root: str,
    catalog: Ref,
    config: TrainConfig,
    settings: GeneralizationConfig,
    threshold: float = 0.5,
    normalize: NormalizeConfig | None = None,
) -> StageResult:
    """The leave-one-generator-out table (catalog: its parquet; table: its rows; loo.* metrics): per generator of
    the split's AI images, config's backbone trained without that generator's images, tested on them and on the
    real test images. With fewer than two generators: an empty table and a note saying why."""
    from pipeline_lib.assess import generalization as loo
    from pipeline_lib.core import devices

    workspace = Workspace.create(root)
    table = cat.read_snapshot(workspace, catalog)
    names = split.known_generators(table)
    device = devices.resolve_device(config.device)
    how = loo.LeaveOutSettings(settings.mode, settings.finetune_epochs, threshold, device)
    out_dir = workspace.models / current_stage_key()[:16]
    result = loo.leave_one_out(workspace, table, config, how, out_dir, _active(normalize))
    notes = [loo.no_table_note(len(names))] if len(names) < loo.MIN_GENERATORS else []
    notes += [f"leave-one-generator-out of {r.generator}: {r.note}" for r in result.itertuples() if r.note]
    ref = cat.write_table(workspace, "reports", "generalization", result)
    return StageResult(ref, loo.loo_metrics(result), notes, loo.table_rows(result))


@task(name="report")
def make_report(
    root: str,
    model_ref: Ref,
    evaluation: EvalOutput,
    config: ReportConfig,
    title: str,
    normalize: NormalizeConfig | None = None,
    device: str = "cpu",
    notes: list[str] | None = None,
    history: list[dict[str, Any]] | None = None,
    data_version: str = "",
    held_out_generator: str | None = None,
    review_numbers: dict[str, float] | None = None,
    loo_table: StageResult | None = None,
    generalization_note: str = "",
    health_notes: list[str] | None = None,
) -> Ref:
    """Self-contained HTML report: headline, warnings (notes of the run's stages, health_notes of its crawl: not in
    the stage key), learning curves (history), the review gate's numbers (review_numbers), then the details (plots,
    robustness, per-generator scores with held_out_generator marked, the leave-one-generator-out table of the
    generalization stage (loo_table; or generalization_note: why there is none), every test group counted, Original |
    Grad-CAM pairs computed on device, each cell's total) and all metrics.

    loo_table is not called `generalization`: code_index would take that name for the task of the same name and
    put the leave-one-out training code into the report's key."""
    from pipeline_lib.assess import evaluate as evaluate_lib
    from pipeline_lib.assess import report
    from pipeline_lib.core import devices
    from pipeline_lib.learn import models
    from pipeline_lib.learn.history import plot_learning_curves

    workspace = Workspace.create(root)
    model, meta = models.load_model(model_ref.resolve(workspace))
    device = devices.resolve_device(device)
    predictions = pd.read_parquet(evaluation.predictions.resolve(workspace))
    selected = report_content.select_examples(predictions, config.images_per_cell)
    size, active = int(meta["image_size"]), _active(normalize)
    images = preprocess.load_tensors(workspace, selected["sha256"].tolist(), size, active)
    out_dir = evaluation.predictions.resolve(workspace).parent / f"report-{current_stage_key()[:12]}"
    plots = {name: workspace.root / path for name, path in evaluation.plots.items()}
    if history:
        curves = plot_learning_curves(history, out_dir.parent / "learning_curves.png")
        plots = {"learning_curves": curves, **plots}
    model_name = f"{meta.get('model_name')} ({model_ref.digest[:8]})"
    index = report.build_report(
        out_dir,
        model,
        images,
        selected,
        evaluation.metrics,
        evaluate_lib.per_group_accuracy(predictions),
        models.target_layer(model),
        config.cam_method,
        title,
        plots=plots,
        reshape_transform=models.cam_reshape(model),
        run_info={
            "model": str(meta.get("model_name")),
            "Grad-CAM layer": models.cam_layer_name(model),
            "model digest": model_ref.digest[:16],
            "normalisation": policy_key(active) if active else "none",
            "temperature": f"{evaluation.temperature:.4f}"
            + "".join(f" ({note})" for note in evaluation.notes if note.startswith("temperature scaling skipped")),
        },
        per_generator=pd.DataFrame(evaluation.generators) if evaluation.generators else None,
        cam_target=config.cam_target,
        device=device,
        originals=_originals(workspace, selected["sha256"].tolist()),
        warnings=report_content.report_warnings(
            [*(notes or []), *(health_notes or []), *evaluation.notes], evaluation.metrics, config.data_note
        ),
        top=report_content.headline(evaluation.metrics, model_name, data_version),
        cell_totals=report_content.cell_counts(predictions),
        held_out_generator=held_out_generator,
        review=review_numbers,
        generalization=_generalization_section(loo_table, generalization_note),
    )
    return workspace.ref(index)


def _generalization_section(result: StageResult | None, note: str) -> dict[str, Any]:
    """The report's Generalization section from the stage's result, or the note saying why there is none."""
    from pipeline_lib.assess import report

    rows, notes = (result.table, result.notes) if result is not None else ([], [])
    return report.generalization_section(rows, [*notes, note] if note else notes)


def _originals(workspace: Workspace, shas: list[str]) -> dict[str, Any]:
    """sha256 -> stored original of each selected test image (missing ones are left out: the model input shows)."""
    found = {}
    for sha256 in shas:
        try:
            found[sha256] = preprocess.find_original(workspace, sha256)
        except FileNotFoundError as error:
            log.warning("report shows the model input for %s: %s", sha256[:12], error)
    return found
