"""Evaluation on the held-out split: probabilities, a predictions table and metrics (the plots are in plots)."""

from __future__ import annotations

import contextlib
import logging
import math
import re
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import (
    average_precision_score,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
)

from pipeline_lib.assess import stats
from pipeline_lib.core.config import NormalizeConfig
from pipeline_lib.core.progress import progress
from pipeline_lib.core.workspace import Workspace
from pipeline_lib.learn import models, preprocess, probe
from pipeline_lib.learn.normalize import ROBUSTNESS_VARIANTS

log = logging.getLogger(__name__)

CLASS_NAMES: tuple[str, ...] = ("real", "ai")  # index = class id of the model's logits
POSITIVE = "ai"
ROW_COLUMNS: tuple[str, ...] = ("sha256", "group", "label", "source", "url", "keyword")
OPTIONAL_ROW_COLUMNS: dict[str, str] = {"generator": "unknown"}  # copied when present, else this value
PREDICTION_COLUMNS: tuple[str, ...] = (*ROW_COLUMNS, "generator", "p_ai", "p_ai_raw", "predicted", "correct")
_BOOTSTRAP_CELLS = 5_000_000  # resampled indices held in memory at once
CALIBRATION_BINS = 10  # equal-width bins of p_ai for ECE and the reliability plot


def check_images(images: torch.Tensor) -> None:
    """Raise ValueError unless images is a uint8 tensor shaped [N, 3, H, W]."""
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
        kind = images.dtype if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a uint8 torch.Tensor [N,3,H,W] (from preprocess.load_tensors), got {kind}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape [N,3,H,W], got {list(images.shape)}")


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def _check_threshold(threshold: float) -> None:
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"evaluate.threshold must be strictly between 0 and 1, got {threshold}")


@contextlib.contextmanager
def borrowed_model(model: torch.nn.Module, device: str, requires_grad: bool | None = None) -> Iterator[torch.nn.Module]:
    """Put model in eval mode on device for a block, then restore its device, mode, requires_grad and grads."""
    params = list(model.parameters())
    home = params[0].device if params else None
    was_training = model.training
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    try:
        model.to(device)
        model.eval()
        if requires_grad is not None:
            for param in params:
                param.requires_grad_(requires_grad)
        yield model
    finally:
        for param, flag, grad in zip(params, flags, grads, strict=True):
            param.requires_grad_(flag)
            param.grad = grad
        if home is not None:
            model.to(home)
        model.train(was_training)


def to_float(batch: torch.Tensor, device: str) -> torch.Tensor:
    """uint8 NCHW batch -> float32 in [0, 1] on device (what a Classifier's forward expects)."""
    return batch.to(device=device, dtype=torch.float32) / 255.0


def predict_logits(
    model: torch.nn.Module, images: torch.Tensor, batch_size: int = 64, device: str = "cpu"
) -> np.ndarray:
    """Logits float64 [N, 2] (real, ai) for every image, in eval mode; the model is left as it was given."""
    check_images(images)
    _check_batch_size(batch_size)
    chunks: list[np.ndarray] = []
    with borrowed_model(model, device), torch.inference_mode():
        starts = range(0, len(images), batch_size)
        for start in progress(starts, len(images), "scoring", step=batch_size):
            logits = model(to_float(images[start : start + batch_size], device))
            if logits.ndim != 2 or logits.shape[1] != len(CLASS_NAMES):
                raise ValueError(f"model must return logits shaped [N,2] (real, ai), got {list(logits.shape)}")
            chunks.append(logits.float().cpu().numpy())
    log.debug("predicted %d images in batches of %d", len(images), batch_size)
    return np.concatenate(chunks).astype(np.float64) if chunks else np.empty((0, 2), dtype=np.float64)


def stored_logits(
    workspace: Workspace,
    model: torch.nn.Module,
    shas: list[str],
    size: int,
    active: NormalizeConfig | None,
    device: str = "cpu",
) -> np.ndarray:
    """Logits of stored images: a probe's from the cached features of its backbone (learn/probe.py), any other
    model's from the tensor cache (active: the normalisation policy when it re-encodes, else None)."""
    if models.is_probe(model):
        return probe.cached_logits(workspace, model, shas, size, active, device)
    return predict_logits(model, preprocess.load_tensors(workspace, shas, size, active), device=device)


def softmax_p_ai(logits: np.ndarray) -> np.ndarray:
    """p_ai = softmax(logits)[:, 1] for logits [N, 2] (real, ai)."""
    array = np.asarray(logits, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != len(CLASS_NAMES):
        raise ValueError(f"logits must be shaped [N,2] (real, ai), got {list(array.shape)}")
    return 1.0 / (1.0 + np.exp(np.clip(array[:, 0] - array[:, 1], -700.0, 700.0)))


def predict_probabilities(
    model: torch.nn.Module, images: torch.Tensor, batch_size: int = 64, device: str = "cpu"
) -> np.ndarray:
    """p_ai = softmax(logits)[:, 1] for every image, in eval mode; the model is left as it was given."""
    return softmax_p_ai(predict_logits(model, images, batch_size, device))


def _check_scores(p_ai: np.ndarray, n: int, name: str) -> np.ndarray:
    scores = np.asarray(p_ai, dtype=np.float64)
    if scores.shape != (n,):
        raise ValueError(f"{name} must hold one value per test row ({n}), got shape {scores.shape}")
    if scores.size and (np.isnan(scores).any() or scores.min() < 0.0 or scores.max() > 1.0):
        raise ValueError(f"{name} must be probabilities in [0, 1] without NaN")
    return scores


def predictions_table(
    test_rows: pd.DataFrame, p_ai: np.ndarray, threshold: float, p_ai_raw: np.ndarray | None = None
) -> pd.DataFrame:
    """A new frame: the rows' identity columns and generator, p_ai, p_ai_raw, predicted (p_ai >= threshold), correct.

    p_ai is the score decisions use (calibrated when temperature scaling is on); p_ai_raw the model's own softmax
    (defaults to p_ai). generator comes from the catalog (missing column: 'unknown').
    """
    _check_threshold(threshold)
    missing = [name for name in ROW_COLUMNS if name not in test_rows.columns]
    if missing:
        raise ValueError(f"test rows are missing catalog columns: {', '.join(missing)}")
    scores = _check_scores(p_ai, len(test_rows), "p_ai")
    raw = scores if p_ai_raw is None else _check_scores(p_ai_raw, len(test_rows), "p_ai_raw")
    table = test_rows.loc[:, list(ROW_COLUMNS)].reset_index(drop=True).copy()
    for name in ROW_COLUMNS:
        table[name] = table[name].astype("string").fillna("")
    for name, default in OPTIONAL_ROW_COLUMNS.items():
        values = test_rows[name] if name in test_rows.columns else pd.Series(default, index=test_rows.index)
        values = values.reset_index(drop=True).astype("string").fillna("")
        table[name] = values.where(values != "", default)
    bad = sorted(set(table["label"]) - set(CLASS_NAMES))
    if bad:
        raise ValueError(f"test rows' label must be one of {CLASS_NAMES}, got {bad}")
    table["p_ai"] = scores
    table["p_ai_raw"] = raw
    table["predicted"] = pd.Series(np.where(scores >= threshold, "ai", "real"), dtype="string")
    table["correct"] = (table["predicted"] == table["label"]).astype(bool)
    return table


def _truth_and_decision(predictions: pd.DataFrame, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(y_true, y_pred, scores) with ai = 1; y_pred re-derived from p_ai at threshold."""
    missing = [name for name in ("label", "p_ai") if name not in predictions.columns]
    if missing:
        raise ValueError(f"predictions are missing columns: {', '.join(missing)} (build them with predictions_table)")
    scores = predictions["p_ai"].to_numpy(dtype=np.float64)
    y_true = (predictions["label"] == POSITIVE).to_numpy(dtype=np.int64)
    y_pred = (scores >= threshold).astype(np.int64)
    return y_true, y_pred, scores


def bootstrap_interval(hits: np.ndarray, n_bootstrap: int, seed: int, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of hits (0/1 per row); (nan, nan) when n_bootstrap is 0."""
    if n_bootstrap < 0:
        raise ValueError(f"evaluate.bootstrap must be >= 0, got {n_bootstrap}")
    if n_bootstrap == 0 or hits.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    # Resample in chunks so a large test set does not need n_bootstrap * n indices at once.
    per_chunk = max(1, _BOOTSTRAP_CELLS // hits.size)
    means: list[np.ndarray] = []
    for start in range(0, n_bootstrap, per_chunk):
        count = min(per_chunk, n_bootstrap - start)
        means.append(hits[rng.integers(0, hits.size, size=(count, hits.size))].mean(axis=1))
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(np.concatenate(means), [tail, 100.0 - tail])
    return float(low), float(high)


def _ranking_metrics(y_true: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """ROC AUC and average precision; nan when the test set holds one class only."""
    if len(np.unique(y_true)) < 2:
        log.warning("test set holds one class only: roc_auc and average_precision are undefined (nan)")
        return {"roc_auc": math.nan, "average_precision": math.nan}
    return {
        "roc_auc": float(roc_auc_score(y_true, scores)),
        "average_precision": float(average_precision_score(y_true, scores)),
    }


def calibration_bins(y_true: np.ndarray, p_ai: np.ndarray, n_bins: int = CALIBRATION_BINS) -> pd.DataFrame:
    """Equal-width bins of p_ai over [0, 1]: count, mean p_ai and fraction of ai per bin (empty bins: count 0, nan).

    Bin b holds p_ai in [b/n, (b+1)/n), found as floor(p_ai * n) so that decimal edges such as 0.3 fall in
    the bin they start (linspace edges are off by an ulp); the last bin also holds p_ai = 1.
    """
    if not isinstance(n_bins, int) or isinstance(n_bins, bool) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    truth = np.asarray(y_true, dtype=np.float64)
    scores = np.asarray(p_ai, dtype=np.float64)
    if truth.shape != scores.shape or scores.ndim != 1:
        raise ValueError(f"y_true and p_ai must be 1-D and the same length, got {truth.shape} and {scores.shape}")
    if scores.size and (np.isnan(scores).any() or scores.min() < 0.0 or scores.max() > 1.0):
        raise ValueError("p_ai must be probabilities in [0, 1] without NaN")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.clip(np.floor(scores * n_bins).astype(np.int64), 0, n_bins - 1)
    count = np.bincount(index, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.bincount(index, weights=scores, minlength=n_bins) / count
        frac_ai = np.bincount(index, weights=truth, minlength=n_bins) / count
    return pd.DataFrame(
        {"low": edges[:-1], "high": edges[1:], "count": count.astype(int), "mean_p_ai": mean_p, "frac_ai": frac_ai}
    )


def expected_calibration_error(y_true: np.ndarray, p_ai: np.ndarray, n_bins: int = CALIBRATION_BINS) -> float:
    """ECE of p_ai: sum over equal-width bins of (bin share) * |fraction of ai - mean p_ai|."""
    bins = calibration_bins(y_true, p_ai, n_bins)
    filled = bins[bins["count"] > 0]
    if filled.empty:
        raise ValueError("cannot compute ECE on an empty test set")
    weights = filled["count"].to_numpy(dtype=np.float64) / filled["count"].sum()
    gaps = np.abs(filled["frac_ai"].to_numpy() - filled["mean_p_ai"].to_numpy())
    return float(np.sum(weights * gaps))


def compute_metrics(
    predictions: pd.DataFrame,
    threshold: float,
    n_bootstrap: int = 1000,
    seed: int = 0,
    n_bins: int = CALIBRATION_BINS,
) -> dict[str, float]:
    """Accuracy (+ bootstrap 95% CI), per-class precision/recall/F1, AUCs, ECE, confusion entries; plain floats."""
    _check_threshold(threshold)
    if len(predictions) == 0:
        raise ValueError("cannot compute metrics on an empty test set (is the test split empty?)")
    y_true, y_pred, scores = _truth_and_decision(predictions, threshold)
    hits = (y_true == y_pred).astype(np.float64)
    low, high = bootstrap_interval(hits, n_bootstrap, seed)
    metrics: dict[str, float] = {"accuracy": float(hits.mean()), "accuracy_ci_low": low, "accuracy_ci_high": high}
    wilson_low, wilson_high = stats.wilson_interval(int(hits.sum()), int(hits.size))
    metrics |= {"accuracy_wilson_low": wilson_low, "accuracy_wilson_high": wilson_high}
    precision, recall, f1, _ = precision_recall_fscore_support(y_true, y_pred, labels=[0, 1], zero_division=0)
    for index, name in enumerate(CLASS_NAMES):
        metrics[f"precision_{name}"] = float(precision[index])
        metrics[f"recall_{name}"] = float(recall[index])
        metrics[f"f1_{name}"] = float(f1[index])
    metrics.update(_ranking_metrics(y_true, scores))
    metrics["ece"] = expected_calibration_error(y_true, scores, n_bins)
    tn, fp, fn, tp = confusion_matrix(y_true, y_pred, labels=[0, 1]).ravel()
    metrics.update({"tn": float(tn), "fp": float(fp), "fn": float(fn), "tp": float(tp)})
    metrics.update(
        {"n_test": float(len(y_true)), "n_ai": float(y_true.sum()), "n_real": float(len(y_true) - y_true.sum())}
    )
    metrics["threshold"] = float(threshold)
    return metrics


def rescore_accuracy(
    model: torch.nn.Module,
    images: torch.Tensor,
    test_rows: pd.DataFrame,
    threshold: float,
    batch_size: int = 64,
    device: str = "cpu",
) -> float:
    """Accuracy of model on test rows (images in the same order) at threshold: how a champion is re-scored."""
    predictions = predictions_table(test_rows, predict_probabilities(model, images, batch_size, device), threshold)
    return compute_metrics(predictions, threshold, n_bootstrap=0)["accuracy"]


def robustness_metrics(
    model: torch.nn.Module,
    load_variant: Callable[[str], torch.Tensor],
    labels: pd.Series | np.ndarray | list,
    threshold: float,
    variants: Sequence[str] | None = None,
    temperature: float = 1.0,
    batch_size: int = 64,
    device: str = "cpu",
) -> dict[str, float]:
    """robust.<variant>.accuracy and .roc_auc of the model on each variant's images (default: normalize's JPEG
    95/75/50 and downscale 50%); p_ai = sigmoid(logit margin / temperature), the same decision rule as the clean score.

    load_variant(name) gives the variant's uint8 images [N,3,H,W] in the order of labels, e.g.
    preprocess.degraded_tensors: the original files degraded as a user would, then preprocessed as for training.
    The images are scored on device in batches.
    """
    _check_threshold(threshold)
    y_true = (np.asarray(labels, dtype=object) == POSITIVE).astype(np.int64)
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    metrics: dict[str, float] = {}
    for name in ROBUSTNESS_VARIANTS if variants is None else variants:
        images = load_variant(name)
        check_images(images)
        if y_true.shape != (len(images),):
            raise ValueError(f"labels must hold one entry per image ({len(images)}), got {y_true.shape}")
        logits = predict_logits(model, images, batch_size, device) if len(images) else np.empty((0, 2))
        scores = softmax_p_ai(logits / temperature)
        hits = (scores >= threshold).astype(np.int64) == y_true
        metrics[f"robust.{name}.accuracy"] = float(hits.mean()) if hits.size else math.nan
        metrics[f"robust.{name}.roc_auc"] = _ranking_metrics(y_true, scores)["roc_auc"] if hits.size else math.nan
    return metrics


def generator_metrics(predictions: pd.DataFrame, threshold: float) -> tuple[dict[str, float], pd.DataFrame]:
    """(generator.<name>.accuracy/ap/roc_auc metrics, the stats.per_generator_metrics table) of a predictions table."""
    table = stats.per_generator_metrics(predictions, threshold)
    metrics: dict[str, float] = {}
    for row in table.itertuples(index=False):
        prefix = f"generator.{_slug(str(row.generator))}"
        metrics |= {f"{prefix}.accuracy": row.accuracy, f"{prefix}.ap": row.average_precision}
        metrics |= {f"{prefix}.roc_auc": row.roc_auc, f"{prefix}.n": float(row.n)}
    return metrics, table


def _slug(text: str) -> str:
    """A name as an MLflow-safe metric name part (word characters, '-', '.'; others become '_')."""
    return re.sub(r"[^\w\-.]+", "_", text.strip()).strip("_") or "_"


def per_group_accuracy(predictions: pd.DataFrame) -> pd.DataFrame:
    """Accuracy per (group, label), worst first (ties: larger groups first, then by name)."""
    missing = [name for name in ("group", "label", "correct") if name not in predictions.columns]
    if missing:
        raise ValueError(f"predictions are missing columns: {', '.join(missing)} (build them with predictions_table)")
    frame = predictions.loc[:, ["group", "label", "correct"]].copy()
    frame["correct"] = frame["correct"].astype(float)
    table = frame.groupby(["group", "label"], as_index=False, observed=True).agg(
        n=("correct", "size"), accuracy=("correct", "mean")
    )
    table["n"] = table["n"].astype(int)
    table = table.sort_values(["accuracy", "n", "group", "label"], ascending=[True, False, True, True])
    return table.reset_index(drop=True)
