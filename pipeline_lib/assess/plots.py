"""The evaluation's plots as PNG files: confusion matrix, ROC, precision-recall and reliability (Agg, no pyplot)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import average_precision_score, confusion_matrix, precision_recall_curve, roc_auc_score, roc_curve

from pipeline_lib.assess.evaluate import (
    CALIBRATION_BINS,
    CLASS_NAMES,
    POSITIVE,
    calibration_bins,
    expected_calibration_error,
)
from pipeline_lib.core.workspace import atomic_path


def _save_figure(figure: Figure, path: Path) -> Path:
    """Render figure with Agg to a PNG at path, atomically."""
    FigureCanvasAgg(figure)
    with atomic_path(Path(path)) as tmp:
        figure.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    return Path(path)


def _note(axes: Axes, text: str) -> None:
    """Write a centred note on empty axes (used when a curve is undefined)."""
    axes.text(0.5, 0.5, text, ha="center", va="center", wrap=True)
    axes.set_axis_off()


def plot_confusion_matrix(predictions: pd.DataFrame, path: Path) -> Path:
    """PNG of the 2x2 confusion matrix (rows: true label, columns: predicted label)."""
    labels = list(CLASS_NAMES)
    matrix = confusion_matrix(predictions["label"], predictions["predicted"], labels=labels)
    figure = Figure(figsize=(4.0, 3.6))
    axes = figure.subplots()
    image = axes.imshow(matrix, cmap="Blues", vmin=0)
    figure.colorbar(image, ax=axes)
    axes.set_xticks(range(len(labels)), labels=labels)
    axes.set_yticks(range(len(labels)), labels=labels)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    threshold = matrix.max() / 2.0 if matrix.size else 0.0
    for (row, col), count in np.ndenumerate(matrix):
        axes.text(col, row, str(count), ha="center", va="center", color="white" if count > threshold else "black")
    axes.set_title(f"confusion matrix (n={int(matrix.sum())})")
    return _save_figure(figure, path)


def plot_roc(predictions: pd.DataFrame, path: Path) -> Path:
    """PNG of the ROC curve (ai = positive); a note instead when the test set has one class."""
    y_true = (predictions["label"] == POSITIVE).to_numpy(dtype=np.int64)
    figure = Figure(figsize=(4.0, 4.0))
    axes = figure.subplots()
    if len(np.unique(y_true)) < 2:
        _note(axes, "ROC undefined: the test set holds one class only")
        return _save_figure(figure, path)
    fpr, tpr, _ = roc_curve(y_true, predictions["p_ai"].to_numpy(dtype=np.float64))
    auc = roc_auc_score(y_true, predictions["p_ai"].to_numpy(dtype=np.float64))
    axes.plot(fpr, tpr, label=f"AUC = {auc:.3f}")
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", label="chance")
    axes.set_xlabel("false positive rate")
    axes.set_ylabel("true positive rate")
    axes.set_title("ROC (positive = ai)")
    axes.legend(loc="lower right")
    return _save_figure(figure, path)


def plot_pr(predictions: pd.DataFrame, path: Path) -> Path:
    """PNG of the precision-recall curve (ai = positive); a note instead when the test set has one class."""
    y_true = (predictions["label"] == POSITIVE).to_numpy(dtype=np.int64)
    figure = Figure(figsize=(4.0, 4.0))
    axes = figure.subplots()
    if len(np.unique(y_true)) < 2:
        _note(axes, "precision-recall undefined: the test set holds one class only")
        return _save_figure(figure, path)
    scores = predictions["p_ai"].to_numpy(dtype=np.float64)
    precision, recall, _ = precision_recall_curve(y_true, scores)
    average = average_precision_score(y_true, scores)
    axes.step(recall, precision, where="post", label=f"AP = {average:.3f}")
    axes.axhline(y_true.mean(), linestyle="--", color="grey", label="prevalence")
    axes.set_xlabel("recall")
    axes.set_ylabel("precision")
    axes.set_ylim(0.0, 1.05)
    axes.set_title("precision-recall (positive = ai)")
    axes.legend(loc="lower left")
    return _save_figure(figure, path)


def plot_reliability(predictions: pd.DataFrame, path: Path, n_bins: int = CALIBRATION_BINS) -> Path:
    """PNG reliability diagram: fraction of ai vs mean p_ai per equal-width bin, with the ECE and bin counts."""
    y_true = (predictions["label"] == POSITIVE).to_numpy(dtype=np.int64)
    scores = predictions["p_ai"].to_numpy(dtype=np.float64)
    figure = Figure(figsize=(4.0, 4.6))
    axes, counts = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    if len(y_true) == 0:
        _note(axes, "reliability undefined: the test set is empty")
        counts.set_axis_off()
        return _save_figure(figure, path)
    bins = calibration_bins(y_true, scores, n_bins)
    width = 1.0 / n_bins
    filled = bins[bins["count"] > 0]
    # The bars span each bin; the red points sit at the bin's mean p_ai, where calibration is judged.
    axes.bar(filled["low"], filled["frac_ai"], width=width, align="edge", alpha=0.7, label="share ai in the bin")
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    axes.plot(
        filled["mean_p_ai"], filled["frac_ai"], marker="o", color="tab:red", label="share ai at the bin's mean p_ai"
    )
    axes.set_xlim(0.0, 1.0)
    axes.set_ylim(0.0, 1.05)
    axes.set_ylabel("fraction ai")
    ece = expected_calibration_error(y_true, scores, n_bins)
    axes.set_title(f"reliability (ECE = {ece:.3f}, {n_bins} bins)")
    axes.legend(loc="upper left", fontsize="small")
    counts.bar(bins["low"], bins["count"], width=width, align="edge", edgecolor="black", color="tab:grey")
    counts.set_xlabel("p_ai")
    counts.set_ylabel("images")
    return _save_figure(figure, path)
