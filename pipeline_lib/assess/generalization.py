"""Leave-one-generator-out: for each generator the AI images name, a model trained without its images and tested on
them (and on every real test image). How a detector does on a generator it never saw, beside the seen ones.

Each left-out model is the configured backbone trained as cheaply as its mode allows: a probe re-trains in seconds
on the cached features of the frozen backbone; a fine-tuned model gets a short budget (report.generalization
.finetune_epochs), which the table says, so its figures are a lower bound of what the full recipe would reach.
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline_lib.assess import evaluate
from pipeline_lib.core.catalog import STATUS_OK
from pipeline_lib.core.config import NormalizeConfig, TrainConfig
from pipeline_lib.core.workspace import Workspace
from pipeline_lib.curate import split
from pipeline_lib.learn import models
from pipeline_lib.learn.train import train_model

log = logging.getLogger(__name__)

MIN_GENERATORS = 2  # with one generator there is nothing to leave out and still train on
COLUMNS: tuple[str, ...] = (
    "generator",
    "n_test",
    "n_ai",
    "n_real",
    "accuracy",
    "accuracy_ci_low",
    "accuracy_ci_high",
    "roc_auc",
    "train_seconds",
    "how",
    "note",
)


@dataclass(frozen=True)
class LeaveOutSettings:
    """How the left-out models are trained and scored: report.generalization's mode and budget, evaluate's
    threshold, the device of train.device."""

    mode: str = "auto"  # auto | probe (off never gets here)
    finetune_epochs: int = 3
    threshold: float = 0.5
    device: str = "cpu"


def slug(generator: str) -> str:
    """A generator name as an MLflow metric name part and a folder name (word characters, '-', '.')."""
    return re.sub(r"[^\w\-.]+", "_", generator.strip()).strip("_") or "_"


def leave_out_config(config: TrainConfig, settings: LeaveOutSettings) -> tuple[TrainConfig, str]:
    """(the training config of each left-out model, how the table describes that training).

    1. A probe (train.mode probe, or report.generalization.mode probe) trains as configured: seconds on cached features.
    2. Fine-tuning keeps the recipe's schedule within finetune_epochs: half of them head-only at most.
    """
    if settings.mode == "probe" or config.resolved_mode == "probe":  # 1.
        probe = config.model_copy(update={"mode": "probe"})
        return probe, f"probe: {config.probe.head} head on frozen {config.model} features"
    epochs = min(config.epochs, settings.finetune_epochs)  # 2.
    short = config.model_copy(update={"epochs": epochs, "head_only_epochs": min(config.head_only_epochs, epochs // 2)})
    return short, f"finetune {config.model}, {epochs} epoch(s) at most (a short run; train.epochs is {config.epochs})"


def scored_rows(view: pd.DataFrame, generator: str) -> pd.DataFrame:
    """The test rows of a left-out view that score generator: its AI images and every real image, by sha256."""
    rows = view[(view["status"] == STATUS_OK) & (view["split"] == "test")].drop_duplicates("sha256")
    named = rows["generator"].fillna("").astype(str) == generator
    keep = (rows["label"] == "real") | ((rows["label"] == "ai") & named)
    return rows[keep].sort_values("sha256").reset_index(drop=True)


def leave_one_out(
    workspace: Workspace,
    catalog: pd.DataFrame,
    config: TrainConfig,
    settings: LeaveOutSettings,
    out_dir: Path,
    policy: NormalizeConfig | None = None,
) -> pd.DataFrame:
    """The leave-one-generator-out table (COLUMNS), one row per generator of the catalog's usable AI images (none
    below MIN_GENERATORS); each left-out model is written under out_dir/<generator>/.

    catalog: a split snapshot (split.leave_generator_out moves each generator's split units to test in turn).
    policy: preprocess.normalize when it re-encodes, else None.
    """
    generators = split.known_generators(catalog)
    if len(generators) < MIN_GENERATORS:
        return pd.DataFrame(columns=list(COLUMNS))
    train_config, how = leave_out_config(config, settings)
    rows = [_leave_out(workspace, catalog, name, train_config, settings, out_dir, policy) | {"how": how}
            for name in generators]  # fmt: skip
    return pd.DataFrame(rows, columns=list(COLUMNS))


def _leave_out(
    workspace: Workspace,
    catalog: pd.DataFrame,
    generator: str,
    config: TrainConfig,
    settings: LeaveOutSettings,
    out_dir: Path,
    policy: NormalizeConfig | None,
) -> dict[str, object]:
    """One row: train without generator, score its AI images against the real test images."""
    try:
        view = split.leave_generator_out(catalog, generator)
    except split.SplitError as error:  # e.g. its images share split units with every other AI image
        log.warning("leave-one-generator-out of %s not possible: %s", generator, error)
        return _empty_row(generator, str(error))
    started = time.perf_counter()
    result = train_model(workspace, view, config, Path(out_dir) / slug(generator), policy=policy)
    seconds = time.perf_counter() - started
    model, meta = models.load_model(result.best_path)
    rows = scored_rows(view, generator)
    logits = evaluate.stored_logits(workspace, model, rows["sha256"].tolist(), int(meta["image_size"]), policy,
                                    settings.device)  # fmt: skip
    predictions = evaluate.predictions_table(rows, evaluate.softmax_p_ai(logits), settings.threshold)
    metrics = evaluate.compute_metrics(predictions, settings.threshold, n_bootstrap=0)
    log.info("left out %s: accuracy %.3f on %d test images, trained in %.1f s", generator, metrics["accuracy"],
             len(rows), seconds)  # fmt: skip
    return {
        "generator": generator,
        "n_test": int(metrics["n_test"]),
        "n_ai": int(metrics["n_ai"]),
        "n_real": int(metrics["n_real"]),
        "accuracy": metrics["accuracy"],
        "accuracy_ci_low": metrics["accuracy_wilson_low"],
        "accuracy_ci_high": metrics["accuracy_wilson_high"],
        "roc_auc": metrics["roc_auc"],
        "train_seconds": seconds,
        "note": "",
    }


def _empty_row(generator: str, note: str) -> dict[str, object]:
    nan = math.nan
    return {"generator": generator, "n_test": 0, "n_ai": 0, "n_real": 0, "accuracy": nan, "accuracy_ci_low": nan,
            "accuracy_ci_high": nan, "roc_auc": nan, "train_seconds": 0.0, "note": note}  # fmt: skip


def loo_metrics(table: pd.DataFrame) -> dict[str, float]:
    """loo.<generator>.accuracy / accuracy_ci_low / accuracy_ci_high / roc_auc / n_test / train_seconds, and
    loo.generators (how many rows); rows that could not be trained are left out."""
    metrics = {"loo.generators": float(len(table))}
    names = ("accuracy", "accuracy_ci_low", "accuracy_ci_high", "roc_auc", "n_test", "train_seconds")
    for row in table.to_dict("records"):
        if row["note"]:
            continue
        metrics |= {f"loo.{slug(str(row['generator']))}.{name}": float(row[name]) for name in names}
    return metrics


def no_table_note(generators: int) -> str:
    """Why the report has no leave-one-generator-out table: the generators the data names are too few."""
    return (
        f"No leave-one-generator-out table: the AI images name {generators} generator(s), and it needs at least "
        f"{MIN_GENERATORS} (set `generator` on each folder source, or a generator column in its group CSV)."
    )


OFF_NOTE = "No leave-one-generator-out table: report.generalization.mode is off."


def table_rows(table: pd.DataFrame) -> list[dict[str, object]]:
    """The table as plain rows (str, int and float values) for a stage result and MLflow."""
    rows = []
    for row in table.to_dict("records"):
        rows.append({k: (v if isinstance(v, str) else float(v) if isinstance(v, float | np.floating) else int(v))
                     for k, v in row.items()})  # fmt: skip
    return rows
