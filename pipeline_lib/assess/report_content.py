"""What the report says before its pictures: the headline numbers, the warnings box, and which examples it shows."""

from __future__ import annotations

import math

import pandas as pd

from pipeline_lib.assess.cam_summary import CAM_FLAG_ABOVE  # not cam: that one imports torch and Grad-CAM

# (cell name, true label, correct?) in the order the report shows them: mistakes first.
CELLS: tuple[tuple[str, str, bool], ...] = (
    ("ai_misclassified", "ai", False),
    ("real_misclassified", "real", False),
    ("ai_correct", "ai", True),
    ("real_correct", "real", True),
)
CELL_TITLES: dict[str, str] = {
    "ai_misclassified": "AI images taken for real photos",
    "real_misclassified": "Real photos taken for AI images",
    "ai_correct": "AI images recognised",
    "real_correct": "Real photos recognised",
}
SMALL_SAMPLE_CI_WIDTH = 0.1  # a 95% interval of accuracy wider than this gets a small-sample warning
AUDIT_NOTE = "format-shortcut audit"  # how the split stage's audit verdict note starts
HEALTH_NOTE = "crawl health:"  # how the crawl stage's health notes start


def cam_warnings(metrics: dict[str, float]) -> list[str]:
    """Warnings for the report when the mean CAM share on the border or on text exceeds the flag threshold."""
    flag_above = float(metrics.get("cam.flag_above", CAM_FLAG_ABOVE))
    n = int(metrics.get("cam.n", 0))
    lines = []
    for part, what in (("border", "the image border"), ("text", "text-like regions")):
        mean = float(metrics.get(f"cam.{part}_share_mean", math.nan))
        flagged = int(metrics.get(f"cam.n_{part}_flagged", 0))
        if not math.isnan(mean) and mean > flag_above:
            lines.append(
                f"The model puts {mean:.0%} of its attention on {what} on average ({flagged} of {n} test images "
                f"above {flag_above:.0%}): it may be reading watermarks, borders or layout instead of content."
            )
    return lines


def split_warning_notes(notes: list[str]) -> tuple[list[str], list[str]]:
    """(the format-shortcut audit notes, the crawl-health notes) among a run's stage notes: the report's warnings.

    The audit's verdict follows from the split, so it can key the report; crawl health describes one crawl.
    """
    audit = [note for note in notes if note.startswith(AUDIT_NOTE)]
    health = [note for note in notes if note.startswith(HEALTH_NOTE)]
    return audit, health


def report_warnings(notes: list[str], metrics: dict[str, float], data_note: str = "") -> list[dict[str, str]]:
    """What the warnings box says, each with its kind: data, format shortcut, small sample, crawler health, CAM.

    notes are the run's stage notes (the audit's verdict, crawl health, ...); only the flagged ones become warnings.
    """
    found = [{"kind": "data", "text": data_note}] if data_note else []
    for note in notes:
        if note.startswith(AUDIT_NOTE) and "[ok]" not in note:
            found.append({"kind": "format shortcut", "text": note})
        elif note.startswith(HEALTH_NOTE):
            found.append({"kind": "crawler health", "text": note.removeprefix(HEALTH_NOTE).strip()})
    width = float(metrics.get("accuracy_ci_high", math.nan)) - float(metrics.get("accuracy_ci_low", math.nan))
    if width > SMALL_SAMPLE_CI_WIDTH:
        n = int(metrics.get("n_test", 0))
        found.append(
            {
                "kind": "small sample",
                "text": f"Only {n} test images: the 95% interval of accuracy is {width:.2f} wide. Differences "
                "smaller than that between runs or models are noise.",
            }
        )
    found += [{"kind": "CAM attention", "text": text} for text in cam_warnings(metrics)]
    return found


def headline(metrics: dict[str, float], model: str, data_version: str) -> dict[str, str]:
    """The numbers the report opens with: accuracy with its interval, ROC-AUC, n, model and data version."""

    def short(name: str) -> str:
        value = float(metrics.get(name, math.nan))
        return "n/a" if math.isnan(value) else f"{value:.3f}"

    return {
        "accuracy": short("accuracy"),
        "interval": f"95% CI {short('accuracy_ci_low')}-{short('accuracy_ci_high')}",
        "roc_auc": short("roc_auc"),
        "n": str(int(metrics.get("n_test", 0))),
        "model": model,
        "data_version": data_version,
    }


def _confidence(predictions: pd.DataFrame) -> pd.Series:
    """Probability the model gave to the class it predicted."""
    p_ai = predictions["p_ai"].astype(float)
    return p_ai.where(predictions["predicted"] == "ai", 1.0 - p_ai)


def cell_counts(predictions: pd.DataFrame) -> dict[str, int]:
    """How many test images each cell (label x correct/misclassified) holds: what the shown examples are a part of."""
    correct = predictions["correct"].astype(bool)
    return {cell: int(((predictions["label"] == label) & (correct == right)).sum()) for cell, label, right in CELLS}


def select_examples(predictions: pd.DataFrame, per_cell: int) -> pd.DataFrame:
    """Up to per_cell rows for each (label x correct/misclassified) cell, most confident first, with a cell column."""
    if per_cell < 1:
        raise ValueError(f"report.images_per_cell must be >= 1, got {per_cell}")
    missing = [name for name in ("sha256", "label", "p_ai", "predicted", "correct") if name not in predictions]
    if missing:
        raise ValueError(f"predictions are missing columns: {', '.join(missing)} (build them with predictions_table)")
    frame = predictions.copy()
    frame["confidence"] = _confidence(frame)
    parts: list[pd.DataFrame] = []
    for cell, label, correct in CELLS:
        rows = frame[(frame["label"] == label) & (frame["correct"].astype(bool) == correct)]
        rows = rows.sort_values(["confidence", "sha256"], ascending=[False, True]).head(per_cell)
        if len(rows):
            parts.append(rows.assign(cell=cell))
    selected = pd.concat(parts, ignore_index=True) if parts else frame.head(0).assign(cell=pd.Series(dtype="string"))
    return selected.drop(columns=["confidence"])
