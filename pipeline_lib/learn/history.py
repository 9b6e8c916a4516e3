"""A training run's history: the numbers of each finished epoch, the console line per epoch, the learning curves."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline_lib.core.workspace import atomic_path


@dataclass
class EpochStats:
    """Numbers of one finished epoch (epoch counts from 1)."""

    epoch: int
    phase: str  # "head" | "all" | "probe" (a head on cached features of a frozen backbone)
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    lr: float
    seconds: float
    images_per_second: float = 0.0  # training images / seconds of the training pass (validation not counted)


def seconds_left(durations: Sequence[float], epoch: int, max_epochs: int) -> float:
    """Seconds the remaining epochs would take at the mean pace of durations (an upper bound: early stopping)."""
    if not durations:
        return math.nan
    return max(0, max_epochs - epoch) * (sum(durations) / len(durations))


def describe_epoch(stats: EpochStats, max_epochs: int, left_s: float) -> str:
    """One console line per epoch: phase, train/val loss and accuracy, images/s and the time left at most."""
    phase = {"head": "head only", "probe": "probe head"}.get(stats.phase, "all layers")
    if math.isnan(left_s):
        left = ""
    elif stats.epoch >= max_epochs or left_s <= 0:
        left = ", last epoch"
    else:
        minutes, seconds = divmod(round(left_s), 60)
        left = f", at most {minutes}:{seconds:02d} left (early stopping may end sooner)"
    return (
        f"epoch {stats.epoch}/{max_epochs} [{phase}]  train loss {stats.train_loss:.3f} acc {stats.train_accuracy:.3f}"
        f"  |  val loss {stats.val_loss:.3f} acc {stats.val_accuracy:.3f}  |  {stats.images_per_second:.0f} img/s, "
        f"{stats.seconds:.1f} s{left}"
    )


_CURVE_KEYS = ("epoch", "phase", "train_loss", "train_accuracy", "val_loss", "val_accuracy")


def _curve_rows(history: Sequence[EpochStats] | Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """History entries as dicts sorted by epoch; ValueError if empty or an entry lacks a needed key."""
    rows = []
    for number, item in enumerate(history):
        if isinstance(item, EpochStats):
            row = dataclasses.asdict(item)
        elif isinstance(item, Mapping):
            row = dict(item)
        else:
            raise TypeError(f"history entry {number} must be an EpochStats or a dict, got {type(item).__name__}")
        missing = [key for key in _CURVE_KEYS if key not in row]
        if missing:
            raise ValueError(f"history entry {number} lacks {', '.join(missing)}")
        rows.append(row)
    if not rows:
        raise ValueError("history is empty: no epochs to plot")
    return sorted(rows, key=lambda row: int(row["epoch"]))


def curve_marks(history: Sequence[EpochStats] | Sequence[Mapping[str, Any]]) -> tuple[int | None, int | None]:
    """(first all-layers epoch after head-only epochs or None, best epoch = first lowest finite val loss or None)."""
    rows = _curve_rows(history)
    unfreeze = None
    for previous, row in zip(rows, rows[1:], strict=False):
        if previous["phase"] == "head" and row["phase"] == "all":
            unfreeze = int(row["epoch"])
            break
    finite = [row for row in rows if math.isfinite(float(row["val_loss"]))]
    best = int(min(finite, key=lambda row: float(row["val_loss"]))["epoch"]) if finite else None
    return unfreeze, best


def plot_learning_curves(history: list[EpochStats] | list[dict], path: Path) -> Path:
    """PNG of train/val loss and accuracy per epoch, a dashed line where all layers unfreeze, a star at the best."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg only: no display, no pyplot global state
    from matplotlib.figure import Figure

    rows = _curve_rows(history)
    unfreeze, best = curve_marks(rows)
    epochs = [int(row["epoch"]) for row in rows]
    figure = Figure(figsize=(10, 4), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    for axes, key in zip(figure.subplots(1, 2), ("loss", "accuracy"), strict=True):
        val = [float(row[f"val_{key}"]) for row in rows]
        axes.plot(epochs, [float(row[f"train_{key}"]) for row in rows], marker="o", markersize=3, label="train")
        axes.plot(epochs, val, marker="o", markersize=3, label="val")
        if unfreeze is not None:
            axes.axvline(unfreeze - 0.5, color="grey", linestyle="--", label=f"all layers from epoch {unfreeze}")
        if best is not None:
            best_value = val[epochs.index(best)]
            axes.plot([best], [best_value], marker="*", markersize=14, color="red", linestyle="none")
            axes.annotate(f"best (epoch {best})", (best, best_value), textcoords="offset points", xytext=(6, 6))
        axes.set_xlabel("epoch")
        axes.set_ylabel(key)
        axes.set_title(f"{key} per epoch")
        axes.grid(alpha=0.3)
        axes.legend()
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    return path
