"""Prefect tasks: thin adapters that call pipeline_lib, write into the workspace and return small references."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from prefect import task

from pipeline_lib import catalog as cat
from pipeline_lib import crawl as crawl_lib
from pipeline_lib import dedup as dedup_lib
from pipeline_lib import evaluate as evaluate_lib
from pipeline_lib import fingerprint as fingerprint_lib
from pipeline_lib import ingest as ingest_lib
from pipeline_lib import models, preprocess, report, review, split
from pipeline_lib import train as train_lib
from pipeline_lib.config import (
    DedupConfig,
    EvaluateConfig,
    IngestConfig,
    ReportConfig,
    ReviewConfig,
    SourcesConfig,
    SplitConfig,
    TrainConfig,
)
from pipeline_lib.workspace import Ref, Workspace, digest_of


@dataclass(frozen=True)
class StageResult:
    """What a catalog stage hands on: the snapshot reference and a few numbers."""

    catalog: Ref
    metrics: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    table: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class TrainOutput:
    model: Ref
    history: list[dict[str, Any]]
    best_epoch: int
    stopped_early: bool
    weights_name: str
    weights_sha256: str
    device: str


@dataclass(frozen=True)
class EvalOutput:
    predictions: Ref
    metrics: dict[str, float]
    plots: dict[str, str]
    worst_groups: list[dict[str, Any]]


@task(name="crawl")
def crawl_sources(root: str, sources: SourcesConfig, folder_state: str) -> StageResult:
    """Fetch new files from every source into incoming/ and snapshot the crawl log."""
    workspace = Workspace.create(root)
    result = crawl_lib.crawl_sources(workspace, sources)
    log_ref = cat.write_table(workspace, "crawl", "log", result.log)
    totals = result.summary[["new", "skipped", "failed"]].sum()
    metrics = {f"crawl.{k}": float(v) for k, v in totals.items()}
    notes = [f"{r.source} {r.keyword!r}: {r.error}" for r in result.summary.itertuples() if r.error]
    rows = result.summary.to_dict("records")
    table = [{k: (v if isinstance(v, str) else int(v)) for k, v in row.items()} for row in rows]
    return StageResult(log_ref, metrics, notes, table)


@task(name="crawl-log")
def current_crawl_log(root: str, log_digest: str) -> StageResult:
    """Snapshot the crawl log as it stands (no crawling): what `retrain` starts from."""
    workspace = Workspace.create(root)
    table = crawl_lib.read_crawl_log(workspace)
    if table.empty:
        raise ValueError(f"nothing crawled yet in {workspace.root}: run `aidetect crawl` or `aidetect run`")
    return StageResult(cat.write_table(workspace, "crawl", "log", table), {"crawl.logged": float(len(table))})


@task(name="ingest")
def ingest(root: str, crawl_log: Ref, config: IngestConfig) -> StageResult:
    """Validate new files into store/ or quarantine/ and snapshot the catalog."""
    workspace = Workspace.create(root)
    log_table = cat.read_table(workspace, crawl_log)
    table = ingest_lib.ingest(workspace, log_table, config)
    summary = ingest_lib.ingest_summary(table)
    return StageResult(
        cat.write_snapshot(workspace, "ingest", table), {f"ingest.{k}": float(v) for k, v in summary.items()}
    )


@task(name="fingerprint")
def fingerprint(root: str, catalog: Ref, config: DedupConfig) -> StageResult:
    """Perceptual hashes for every ok image (only new images are hashed)."""
    workspace = Workspace.create(root)
    table = cat.read_snapshot(workspace, catalog)
    hashed = fingerprint_lib.fingerprint_catalog(workspace, table, config.algorithm, config.hash_size)
    return StageResult(cat.write_snapshot(workspace, "fingerprint", hashed))


@task(name="dedup")
def dedup(root: str, catalog: Ref, config: DedupConfig) -> StageResult:
    """Exact and near-duplicate clusters; one keeper per cluster."""
    workspace = Workspace.create(root)
    result = dedup_lib.find_duplicates(cat.read_snapshot(workspace, catalog), config.threshold)
    metrics = {"dedup.exact": result.n_exact, "dedup.near": result.n_near, "dedup.clusters": result.n_clusters}
    notes = [f"cross-group cluster: {', '.join(groups)}" for groups in result.cross_group_clusters]
    return StageResult(cat.write_snapshot(workspace, "dedup", result.catalog), metrics, notes)


@task(name="review-gate")
def review_gate(root: str, catalog: Ref, decisions_digest: str, config: ReviewConfig) -> StageResult:
    """Apply human decisions; in require mode stop while images are pending."""
    workspace = Workspace.create(root)
    outcome = review.apply_decisions(
        cat.read_snapshot(workspace, catalog), review.read_decisions(workspace), config.mode
    )
    if config.mode != "off":
        review.write_review_pack(workspace, outcome.catalog, config.thumbnail_size)
    if outcome.pending:
        raise review.ReviewPending(review.pending_message(outcome.pending, workspace))
    metrics = {
        "review.approved": outcome.approved,
        "review.rejected": outcome.rejected,
        "review.auto_approved": outcome.auto_approved,
    }
    return StageResult(cat.write_snapshot(workspace, "review", outcome.catalog), metrics)


@task(name="split")
def make_split(root: str, catalog: Ref, config: SplitConfig, reshuffle: bool = False) -> StageResult:
    """Sticky, group-aware, stratified train/val/test assignment."""
    workspace = Workspace.create(root)
    ratios = {"train": config.train, "val": config.val, "test": config.test}
    state = split.prepare_registry(workspace, ratios, config.seed, reshuffle)
    table = cat.read_snapshot(workspace, catalog)
    plan = split.assign_splits(table, ratios, config.seed, state.registry, state.version)
    split.check_no_leak(plan.catalog)
    split.write_registry(workspace, plan.registry)
    split.write_registry_meta(workspace, state.version, ratios, config.seed)
    table, warnings = split.split_report(plan.catalog, ratios, config.min_groups_per_label)
    metrics = {f"split.{r.split}.{r.label}.images": float(r.images) for r in table.itertuples()}
    metrics |= {f"split.{r.split}.{r.label}.groups": float(r.groups) for r in table.itertuples()}
    metrics |= {"split.registry_version": float(state.version), "split.new_groups": float(plan.new_groups)}
    largest = split.largest_groups(plan.catalog)
    biggest = ", ".join(f"{g['group']} ({g['images']} {g['label']}, {g['split']})" for g in largest)
    notes = [*warnings, *([state.note] if state.note else []), f"largest groups: {biggest}"]
    rows = [{k: (v if isinstance(v, str) else float(v)) for k, v in row.items()} for row in table.to_dict("records")]
    return StageResult(cat.write_snapshot(workspace, "split", plan.catalog), metrics, notes, rows)


@task(name="preprocess")
def preprocess_images(root: str, catalog: Ref, image_size: int) -> StageResult:
    """Decode each split image once into the resized uint8 tensor cache."""
    workspace = Workspace.create(root)
    written = preprocess.preprocess_images(workspace, cat.read_snapshot(workspace, catalog), image_size)
    return StageResult(catalog, {"preprocess.new_tensors": float(written)})


@task(name="train")
def train(root: str, catalog: Ref, config: TrainConfig) -> TrainOutput:
    """Fine-tune the classifier; resumes from the last epoch checkpoint of the same inputs."""
    workspace = Workspace.create(root)
    out_dir = workspace.models / digest_of(catalog.digest, config.model_dump_json())[:16]
    result = train_lib.train_model(workspace, cat.read_snapshot(workspace, catalog), config, out_dir)
    history = [vars(epoch) | {} for epoch in result.history]
    return TrainOutput(
        model=workspace.ref(result.best_path),
        history=history,
        best_epoch=result.best_epoch,
        stopped_early=result.stopped_early,
        weights_name=result.weights.name,
        weights_sha256=result.weights.sha256,
        device=result.device,
    )


def _test_rows(workspace: Workspace, catalog: Ref) -> pd.DataFrame:
    table = cat.read_snapshot(workspace, catalog)
    return table[(table["status"] == cat.STATUS_OK) & (table["split"] == "test")].drop_duplicates("sha256")


@task(name="evaluate")
def evaluate(root: str, catalog: Ref, model_ref: Ref, config: EvaluateConfig) -> EvalOutput:
    """Score the test split: metrics, predictions table and plots."""
    workspace = Workspace.create(root)
    model, meta = models.load_model(model_ref.resolve(workspace))
    rows = _test_rows(workspace, catalog)
    images = preprocess.load_tensors(workspace, rows["sha256"].tolist(), int(meta["image_size"]))
    p_ai = evaluate_lib.predict_probabilities(model, images)
    predictions = evaluate_lib.predictions_table(rows, p_ai, config.threshold)
    out_dir = workspace.reports / digest_of(catalog.digest, model_ref.digest, config.model_dump_json())[:16]
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = {}
    for name, plot in (
        ("confusion_matrix", evaluate_lib.plot_confusion_matrix),
        ("roc", evaluate_lib.plot_roc),
        ("pr", evaluate_lib.plot_pr),
        ("reliability", evaluate_lib.plot_reliability),
    ):
        plot(predictions, out_dir / f"{name}.png")
        plots[name] = workspace.relative(out_dir / f"{name}.png")
    predictions_path = out_dir / "predictions.parquet"
    predictions.to_parquet(predictions_path, index=False)
    metrics = evaluate_lib.compute_metrics(predictions, config.threshold, config.bootstrap)
    worst = evaluate_lib.per_group_accuracy(predictions).head(10).to_dict("records")
    return EvalOutput(workspace.ref(predictions_path), metrics, plots, worst)


@task(name="report")
def make_report(root: str, model_ref: Ref, evaluation: EvalOutput, config: ReportConfig, title: str) -> Ref:
    """Self-contained HTML report with Original | Grad-CAM pairs."""
    workspace = Workspace.create(root)
    model, meta = models.load_model(model_ref.resolve(workspace))
    predictions = pd.read_parquet(evaluation.predictions.resolve(workspace))
    selected = report.select_examples(predictions, config.images_per_cell)
    images = preprocess.load_tensors(workspace, selected["sha256"].tolist(), int(meta["image_size"]))
    out_dir = evaluation.predictions.resolve(workspace).parent / "report"
    index = report.build_report(
        out_dir,
        model,
        images,
        selected,
        evaluation.metrics,
        pd.DataFrame(evaluation.worst_groups),
        models.target_layer(model),
        config.cam_method,
        title,
        plots={name: workspace.root / path for name, path in evaluation.plots.items()},
        run_info={"model": str(meta.get("model_name")), "model digest": model_ref.digest[:16]},
    )
    return workspace.ref(index)
