"""`aidetect compare`: two or more configs (backbones) on the same data and split, as one side-by-side table.

Each contender is one pipeline run's summary: test accuracy with its 95% interval, ROC-AUC, the leave-one-generator-out
rows of its generalization stage and its training time. The table has one column per contender and one row per
measure; it is written as Markdown and as an HTML page (every value escaped) and logged to MLflow in long form.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline_lib.core.config import PipelineConfig

# The config sections that decide the data and its split: they must be equal for a comparison to be fair.
DATA_SECTIONS: tuple[str, ...] = ("sources", "ingest", "dedup", "review", "split", "audit", "preprocess")
MEASURE = "measure"


@dataclass(frozen=True)
class Contender:
    """One config's run: its column label, model and mode, test metrics, training seconds and leave-out rows."""

    label: str
    model: str
    mode: str
    metrics: Mapping[str, float]
    train_seconds: float
    generalization: Sequence[Mapping[str, Any]] = field(default_factory=tuple)
    run_id: str = ""


def contender(label: str, config: PipelineConfig, summary: Mapping[str, Any]) -> Contender:
    """The Contender of one pipeline run's summary (flows.pipeline: metrics, train_seconds, generalization)."""
    return Contender(
        label=label,
        model=config.train.model,
        mode=config.train.resolved_mode,
        metrics=dict(summary.get("metrics", {})),
        train_seconds=float(summary.get("train_seconds", math.nan)),
        generalization=list(summary.get("generalization", [])),
        run_id=str(summary.get("mlflow_run_id", "")),
    )


def differing_sections(configs: Sequence[PipelineConfig]) -> list[str]:
    """The DATA_SECTIONS in which some config differs from the first (empty: they see the same data and split)."""
    first = configs[0]
    return [
        name
        for name in DATA_SECTIONS
        if any(getattr(other, name).model_dump() != getattr(first, name).model_dump() for other in configs[1:])
    ]


def column_labels(names: Sequence[str]) -> list[str]:
    """One label per config (its file's stem); a repeated stem gets #2, #3, ..."""
    seen: dict[str, int] = {}
    labels = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        labels.append(name if seen[name] == 1 else f"{name} #{seen[name]}")
    return labels


def _number(value: Any, digits: int = 3) -> str:
    number = float("nan") if value is None else float(value)
    return "n/a" if math.isnan(number) else f"{number:.{digits}f}"


def _interval(low: Any, high: Any) -> str:
    return f"{_number(low)}-{_number(high)}"


def _held_out_cell(row: Mapping[str, Any] | None) -> str:
    """One contender's leave-out result for one generator: accuracy [95% CI], ROC-AUC."""
    if row is None:
        return "n/a"
    if row.get("note"):
        return f"not trained: {row['note']}"
    interval = _interval(row["accuracy_ci_low"], row["accuracy_ci_high"])
    return f"{_number(row['accuracy'])} [{interval}], AUC {_number(row['roc_auc'])}"


def side_by_side(contenders: Sequence[Contender]) -> pd.DataFrame:
    """The comparison table: a `measure` column, then one column per contender (text cells).

    Rows: model and mode, test accuracy, its 95% CI (evaluate's bootstrap), ROC-AUC, test images, training seconds,
    then per held-out generator (the union of the contenders' leave-one-generator-out tables) accuracy [95% Wilson
    CI], ROC-AUC and the left-out model's training seconds.
    """
    rows: dict[str, list[str]] = {
        "model": [f"{c.model} ({c.mode})" for c in contenders],
        "test accuracy": [_number(c.metrics.get("accuracy")) for c in contenders],
        "95% CI (bootstrap)": [_interval(c.metrics.get("accuracy_ci_low"), c.metrics.get("accuracy_ci_high"))
                               for c in contenders],  # fmt: skip
        "ROC-AUC": [_number(c.metrics.get("roc_auc")) for c in contenders],
        "test images": [str(int(c.metrics.get("n_test", 0))) for c in contenders],
        "train seconds": [_number(c.train_seconds, 1) for c in contenders],
    }
    generators = sorted({str(r["generator"]) for c in contenders for r in c.generalization})
    for generator in generators:
        found = [{str(r["generator"]): r for r in c.generalization}.get(generator) for c in contenders]
        rows[f"held out {generator}: accuracy [95% Wilson CI], ROC-AUC"] = [_held_out_cell(r) for r in found]
        rows[f"held out {generator}: train seconds"] = [_number(r["train_seconds"], 1) if r else "n/a" for r in found]
    if not generators:
        rows["held-out generators"] = ["none (the data names fewer than two generators)"] * len(contenders)
    rows["MLflow run"] = [c.run_id for c in contenders]
    table = pd.DataFrame([[name, *cells] for name, cells in rows.items()])
    table.columns = [MEASURE, *[c.label for c in contenders]]
    return table


def comparison_metrics(contenders: Sequence[Contender]) -> dict[str, float]:
    """<label>.accuracy / accuracy_ci_low / accuracy_ci_high / roc_auc / train_seconds and
    <label>.loo.<generator>.accuracy / roc_auc: the table's numbers as MLflow metrics of the comparison run."""
    metrics: dict[str, float] = {}
    for c in contenders:
        name = metric_name(c.label)
        for key in ("accuracy", "accuracy_ci_low", "accuracy_ci_high", "roc_auc"):
            metrics[f"{name}.{key}"] = float(c.metrics.get(key, math.nan))
        metrics[f"{name}.train_seconds"] = float(c.train_seconds)
        for row in c.generalization:
            if not row.get("note"):
                prefix = f"{name}.loo.{metric_name(str(row['generator']))}"
                metrics |= {f"{prefix}.accuracy": float(row["accuracy"]), f"{prefix}.roc_auc": float(row["roc_auc"])}
    return metrics


def metric_name(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text.strip()) or "_"


def to_markdown(table: pd.DataFrame) -> str:
    """The table as GitHub Markdown (pipes in cells escaped)."""

    def cells(values: Sequence[Any]) -> str:
        return "| " + " | ".join(str(v).replace("|", "\\|") for v in values) + " |"

    lines = [cells(table.columns), cells(["---"] * len(table.columns))]
    lines += [cells(row) for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


STYLE = (
    "body{font-family:system-ui,sans-serif;margin:1.5rem auto;max-width:1100px;padding:0 1rem;color:#222}"
    "table{border-collapse:collapse;margin:1rem 0}th,td{border:1px solid #ccc;padding:.3rem .7rem;font-size:.9rem;"
    "text-align:left}th{background:#f3f3f3}td.measure{font-weight:600;background:#fafafa}"
    "p.note{color:#555;font-size:.85rem}"
)


def to_html(table: pd.DataFrame, title: str, notes: Sequence[str] = ()) -> str:
    """A self-contained HTML page of the table (every cell escaped), with notes under it."""
    esc = html.escape
    head = "".join(f"<th>{esc(str(name))}</th>" for name in table.columns)
    body = "".join(
        "<tr>" + f'<td class="measure">{esc(str(row[0]))}</td>' + "".join(f"<td>{esc(str(v))}</td>" for v in row[1:])
        + "</tr>"
        for row in table.itertuples(index=False)
    )  # fmt: skip
    notes_html = "".join(f'<p class="note">{esc(note)}</p>' for note in notes)
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
        f"<style>{STYLE}</style></head><body><h1>{esc(title)}</h1>"
        f'<table id="comparison"><tr>{head}</tr>{body}</table>{notes_html}</body></html>\n'
    )


def long_form(table: pd.DataFrame) -> pd.DataFrame:
    """The table as (contender, measure, value) rows: what MLflow's table view shows best."""
    return table.melt(id_vars=[MEASURE], var_name="contender", value_name="value")[["contender", MEASURE, "value"]]


def report_paths(reports: Path, comparison_id: str) -> tuple[Path, Path]:
    """(reports/compare-<id>.html, reports/compare-<id>.md)."""
    return reports / f"compare-{comparison_id}.html", reports / f"compare-{comparison_id}.md"
