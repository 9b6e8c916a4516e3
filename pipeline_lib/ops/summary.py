"""Console text for people: aligned columns, rounded numbers with their intervals, no Python reprs.

Pure functions from the dicts the flows return (and the workspace status) to lines; the CLI prints them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pipeline_lib.acquire.imports import IMPORTED, LEFT_OUT, NOT_SEEN, QUARANTINED, FolderAccount

WARNING_MARKS = ("[warn]", "[fail]", "minimum", "crawl health", "attention")
LISTED_REASONS = 5  # files named per outcome before "... and N more"


def aligned(rows: Iterable[tuple[str, str]], indent: str = "  ") -> list[str]:
    """'key   value' lines with the values in one column."""
    rows = [(str(key), str(value)) for key, value in rows]
    width = max((len(key) for key, _ in rows), default=0)
    return [f"{indent}{key.ljust(width)}  {value}".rstrip() for key, value in rows]


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], indent: str = "  ") -> list[str]:
    """A plain text table; columns padded to their widest cell, numbers right-aligned."""
    cells = [[str(item) for item in header], *[[_cell(item) for item in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    numeric = [all(_is_number(row[i]) for row in cells[1:]) and len(cells) > 1 for i in range(len(header))]
    lines = []
    for row in cells:
        parts = [cell.rjust(w) if num else cell.ljust(w) for cell, w, num in zip(row, widths, numeric, strict=True)]
        lines.append(indent + "  ".join(parts).rstrip())
    return lines


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return text in ("n/a", "-")
    return True


def with_interval(value: float, low: float, high: float, n: int | None = None) -> str:
    """'0.865 (95% CI 0.757-0.973, n = 37)'; n/a for a missing value."""
    if value is None or math.isnan(float(value)):
        return "n/a"
    text = f"{value:.3f} (95% CI {low:.3f}-{high:.3f}"
    return text + (f", n = {n})" if n is not None else ")")


def seconds(value: float) -> str:
    """'41.4 s', '3 min 05 s', '1 h 02 min'."""
    value = max(0.0, float(value))
    if value < 60:
        return f"{value:.1f} s"
    minutes, rest = divmod(round(value), 60)
    if minutes < 60:
        return f"{minutes} min {rest:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def stage_states(states: Mapping[str, str]) -> str:
    """'3 computed (train, evaluate, report), 7 cached' in stage order."""
    groups: dict[str, list[str]] = {}
    for stage, state in states.items():
        groups.setdefault({"Completed": "computed", "Cached": "cached"}.get(state, state.lower()), []).append(stage)
    parts = []
    for kind, stages in groups.items():
        listed = f" ({', '.join(stages)})" if kind != "cached" or len(stages) < len(states) else ""
        parts.append(f"{len(stages)} {kind}{listed}")
    return ", ".join(parts)


def model_line(registry: Mapping[str, Any] | None, name: str) -> str:
    """The registered model's version and what happened to the alias it competed for (champion or loo-<generator>):
    moved or stayed, the version that holds it, and why (accuracies and McNemar's verdict in words)."""
    if not registry:
        return "not registered"
    version, alias = str(registry.get("version", "?")), str(registry.get("alias") or "champion")
    holder = registry.get("champion_version")
    if registry.get("reused"):
        moved = _reused(alias, version, holder, bool(registry.get("promoted")))
        return f"{name} version {version} (same checkpoint, registered by an earlier run); {moved}"
    return f"{name} version {version}; {_alias_line(registry, alias, version, holder)}"


def _alias_line(registry: Mapping[str, Any], alias: str, version: str, holder: Any) -> str:
    """'champion moved to version 8 (was version 6): ...' or 'champion stays version 6: ...', with the reason."""
    comparable = registry.get("comparable", True)
    why = registry.get("not_comparable") or registry.get("reason", "")
    if registry.get("promoted") and not holder:
        return f"{alias} is now version {version} (there was no {alias} before)"
    if registry.get("promoted"):
        moved = f"{alias} moved to version {version} (was version {holder})"
        if not comparable:
            return f"{moved} by --promote: {why}"
        return f"{moved}: this model scores higher ({_comparison(registry)})"
    stays = f"{alias} stays version {holder}"
    if not comparable:
        return f"{stays}: {why}; pass --promote to move {alias} to version {version}"
    return f"{stays}: this model is not better ({_comparison(registry)})"


def _reused(alias: str, version: str, holder: Any, promoted: bool) -> str:
    """What happened to the alias when the run's checkpoint was registered before (a cached model)."""
    if promoted:
        return f"{alias} moved to version {version}" + (f" (was version {holder}) by --promote" if holder else "")
    if str(holder) == version:
        return f"{alias} is version {version}"
    return f"{alias} stays version {holder}; pass --promote to move {alias} to version {version}"


def _comparison(registry: Mapping[str, Any]) -> str:
    """'accuracy 0.850 vs 0.800; McNemar p = 0.03, more than noise' (the McNemar part when the holder was scored)."""
    text = f"accuracy {_number(registry.get('challenger_score'))} vs {_number(registry.get('champion_score'))}"
    if registry.get("mcnemar_p") is not None:
        text += f"; McNemar p = {float(registry['mcnemar_p']):.2g}, {registry.get('mcnemar_verdict', '')}".rstrip(", ")
    return text


def split_notes(notes: Iterable[str]) -> tuple[list[str], list[str]]:
    """(warnings, other notes): a note is a warning when it says so ([warn], minimum, crawl health, attention)."""
    warnings, others = [], []
    for note in notes:
        (warnings if any(mark in note for mark in WARNING_MARKS) else others).append(note)
    return warnings, others


def run_lines(summary: Mapping[str, Any]) -> list[str]:
    """The end-of-run summary of the pipeline."""
    metrics = summary.get("metrics") or {}
    lines = ["", f"Pipeline done in {seconds(summary['seconds'])}: {stage_states(summary['states'])}.", ""]
    rows = []
    if metrics:
        n = int(metrics.get("n_test", 0))
        accuracy = with_interval(metrics["accuracy"], metrics["accuracy_ci_low"], metrics["accuracy_ci_high"], n)
        rows += [("test accuracy", accuracy), ("ROC-AUC", _number(metrics.get("roc_auc")))]
    rows.append(("model", model_line(summary.get("registry"), summary.get("registered_model", "aidetect"))))
    if summary.get("data_version"):
        rows.append(("data version", str(summary["data_version"])))
    rows += [("report", str(summary.get("report", "")))]
    rows.append(("MLflow run", f"{summary['mlflow_run_id']}  ({_where_to_open(summary)})"))
    lines += aligned(rows)
    if "warnings" in summary:  # the report's warnings box, word for word
        warnings = [f"{item['kind']}: {item['text']}" for item in summary["warnings"]]
        said = " ".join(item["text"] for item in summary["warnings"])
        notes = [note for note in summary.get("notes", []) if note not in said]
    else:
        warnings, notes = split_notes(summary.get("notes", []))
    lines += _listed("Warnings", warnings, "!") + _listed("Notes", notes, "-")
    return lines


def _where_to_open(summary: Mapping[str, Any]) -> str:
    """How to see the run: a tracking server's own UI, or `aidetect ui` on the workspace's (or the config's) store."""
    uri, workspace = str(summary.get("tracking_uri", "")), summary.get("workspace", "")
    if uri.startswith(("http://", "https://")):
        return f"in the UI of the tracking server {uri}"
    if not uri or (uri.startswith("sqlite:") and uri.endswith(f"{workspace}/mlflow.db")):
        return f"open: aidetect ui --workspace {workspace}"
    return "open: aidetect ui with this run's --config"


def _number(value: Any) -> str:
    return "n/a" if value is None or math.isnan(float(value)) else f"{float(value):.3f}"


def _listed(title: str, items: Sequence[str], mark: str) -> list[str]:
    return ["", f"{title}:", *[f"  {mark} {item}" for item in items]] if items else []


def crawl_lines(result: Mapping[str, Any], accounts: Sequence[FolderAccount] = ()) -> list[str]:
    """What a crawl (or import) fetched per source and keyword, how ingest judged it, and each folder's files."""
    counts = result.get("counts") or {}
    lines = [""]
    rows = [
        (r["source"], r["keyword"] or "-", r["new"], r["skipped"], r["failed"], r.get("error") or "")
        for r in result.get("per_source") or []
        if r["new"] or r["skipped"] or r["failed"] or r.get("error")
    ]
    if rows:
        lines += ["Crawl:", *table(("source", "keyword", "new", "skipped", "failed", "note"), rows), ""]
    invalid = {k.removeprefix("ingest.invalid."): int(v) for k, v in counts.items() if k.startswith("ingest.invalid.")}
    reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(invalid.items()))
    ok = int(counts.get("ingest.ok", 0))
    lines.append(f"Ingest: {ok} image(s) ok, {int(counts.get('ingest.invalid', 0))} quarantined" + (
        f" ({reasons})" if reasons else ""
    ))
    for account in accounts:
        lines += ["", *account_lines(account)]
    return lines


def account_lines(account: FolderAccount) -> list[str]:
    """'28 files in FOLDER: 24 imported, 2 quarantined, 2 left out' and the files with their reasons."""
    total = len(account.files)
    kinds = (IMPORTED, QUARANTINED, LEFT_OUT, NOT_SEEN)
    parts = [f"{account.count(kind)} {kind}" for kind in kinds if account.count(kind)]
    lines = [f"{total} file(s) in {account.folder} (label {account.label}): {', '.join(parts) or 'none'}"]
    for kind in (QUARANTINED, LEFT_OUT, NOT_SEEN):
        items = account.with_reasons(kind)
        shown = [f"    {item.name}: {item.reason}" for item in items[:LISTED_REASONS]]
        more = [f"    ... and {len(items) - LISTED_REASONS} more"] if len(items) > LISTED_REASONS else []
        lines += [f"  {kind}:", *shown, *more] if items else []
    return lines


def status_lines(info: Mapping[str, Any], accounts: Sequence[FolderAccount] = ()) -> list[str]:
    """`aidetect status` as text."""
    lines = [f"workspace {info['workspace']}", ""]
    rows = [("latest stage", str(info.get("stage") or "none yet")), ("images", str(info.get("images", 0)))]
    for key in ("status", "label", "split"):
        if info.get(key):
            rows.append((f"by {key}", ", ".join(f"{k} {v}" for k, v in info[key].items())))
    rows.append(("review", f"{info.get('decisions', 0)} decided, {info.get('undecided', 0)} undecided"))
    lines += aligned(rows)
    for account in accounts:
        lines += ["", *account_lines(account)]
    runs = info.get("runs") or []
    if runs:
        header = ("run", "kind", "status", "started", "test accuracy", "model")
        rows_ = [
            (
                str(r.get("run_id", ""))[:8],
                r.get("kind", ""),
                r.get("status", ""),
                str(r.get("started", ""))[:19].replace("T", " "),
                _number(r.get("test_accuracy")) if r.get("test_accuracy") is not None else "-",
                r.get("model", "") or "-",
            )
            for r in runs
        ]
        lines += ["", "Last runs:", *table(header, rows_)]
    return lines


def prediction_lines(rows: Sequence[Any], model: str) -> list[str]:
    """predict's table: verdict, p_ai, path (and the error or CAM file); which model scored them first."""
    lines = [f"scored by {model}", ""]
    body = []
    for row in rows:
        if row.error:
            body.append(("error", "-", f"{row.path}: {row.error}"))
        else:
            cam = f"  (cam: {row.cam})" if row.cam else ""
            body.append((row.verdict or row.label, f"{row.p_ai:.3f}", f"{row.path}{cam}"))
    return lines + table(("verdict", "p_ai", "file"), body, indent="")
