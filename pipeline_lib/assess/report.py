"""The evaluation report's folder: a self-contained index.html with img/ and plots/ beside it.

The CAM maps come from cam; the headline, warnings and examples from report_content.

index.html embeds every picture as a data: URI and links nothing else on disk, so it shows the same from disk
and from MLflow's artifact view (which loads HTML from a blob: URL in a sandboxed iframe, where relative file
links cannot resolve). The same pictures are also written as PNG files under img/ and plots/ in the folder.
"""

from __future__ import annotations

import base64
import io
import logging
import math
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import pandas as pd
import torch
from PIL import Image

from pipeline_lib.acquire.safety import is_public_link
from pipeline_lib.assess.cam import CAM_TARGETS, cam_classes, cam_overlay, compute_cams, png_bytes
from pipeline_lib.assess.evaluate import CLASS_NAMES, check_images
from pipeline_lib.assess.report_content import CELL_TITLES, CELLS, report_warnings
from pipeline_lib.assess.review_numbers import review_rows
from pipeline_lib.core.workspace import atomic_write_bytes, atomic_write_text
from pipeline_lib.learn.normalize import ROBUSTNESS_DESCRIPTION, ROBUSTNESS_VARIANTS

log = logging.getLogger(__name__)

# Summary metrics shown first in the report, in this order; any other metric follows (in the raw appendix).
HEADLINE_METRICS: tuple[str, ...] = (
    "accuracy",
    "accuracy_ci_low",
    "accuracy_ci_high",
    "accuracy_wilson_low",
    "accuracy_wilson_high",
    "roc_auc",
    "average_precision",
    "ece",
    "ece_raw",
    "calibration.temperature",
    "precision_ai",
    "recall_ai",
    "f1_ai",
    "precision_real",
    "recall_real",
    "f1_real",
    "tn",
    "fp",
    "fn",
    "tp",
    "n_test",
    "threshold",
)
SUMMARY_METRICS = 12  # how many of HEADLINE_METRICS the summary table shows; all metrics are in the appendix
DISPLAY_SIDE = 256  # longest side of the "Original" pictures (from the store, not the model input)
WORST_GROUPS = 20
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_SELECTED_COLUMNS = ("sha256", "group", "label", "source", "url", "keyword", "p_ai", "predicted", "cell")


def display_picture(path: Path, side: int = DISPLAY_SIDE) -> bytes:
    """The stored original as PNG, scaled down so its longest side is at most `side` (aspect ratio kept)."""
    with Image.open(path) as image:
        picture = image.convert("RGB")
    picture.thumbnail((side, side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def _robustness_rows(metrics: dict[str, float]) -> list[dict[str, str]]:
    """Clean score first, then each robustness variant with its accuracy drop."""
    if not any(name.startswith("robust.") for name in metrics):
        return []
    clean = float(metrics.get("accuracy", math.nan))
    rows = [
        {
            "variant": "clean",
            "accuracy": _format_value("accuracy", clean),
            "drop": "",
            "roc_auc": _format_value("roc_auc", metrics.get("roc_auc", math.nan)),
        }
    ]
    names = [n for n in ROBUSTNESS_VARIANTS if f"robust.{n}.accuracy" in metrics]
    names += sorted({n.split(".")[1] for n in metrics if n.startswith("robust.")} - set(names))
    for name in names:
        accuracy = float(metrics.get(f"robust.{name}.accuracy", math.nan))
        rows.append(
            {
                "variant": name,
                "accuracy": _format_value("accuracy", accuracy),
                "drop": _format_value("drop", clean - accuracy),
                "roc_auc": _format_value("roc_auc", metrics.get(f"robust.{name}.roc_auc", math.nan)),
            }
        )
    return rows


def _generator_rows(per_generator: pd.DataFrame | None, held_out: str | None = None) -> list[dict[str, Any]]:
    """stats.per_generator_metrics rows as template rows; held_out (split.leave_out_generator) is marked."""
    if per_generator is None or per_generator.empty:
        return []
    return [
        {
            "generator": str(r["generator"]),
            "held_out": str(r["generator"]) == held_out,
            "n": str(int(r["n"])),
            "n_ai": str(int(r["n_ai"])),
            "accuracy": _format_value("accuracy", r["accuracy"]),
            "average_precision": _format_value("ap", r["average_precision"]),
            "roc_auc": _format_value("roc_auc", r["roc_auc"]),
        }
        for _, r in per_generator.iterrows()
    ]


def data_uri(png: bytes) -> str:
    """A data: URI of PNG bytes (what the report's <img> tags use)."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _write_pair(
    img_dir: Path, sha256: str, image: torch.Tensor, cam: np.ndarray, original: Path | None = None
) -> dict[str, str]:
    """Write img/<sha>_orig.png and img/<sha>_cam.png; return their relative paths and data: URIs.

    The original is the stored file at display size when given (else the model's input); the CAM is drawn over the
    model's input, which is what the model saw.
    """
    if not _SAFE_NAME.match(sha256):
        raise ValueError(f"selected row has an unusable sha256 {sha256!r} (expected a hex digest)")
    pictures: dict[str, str] = {}
    model_input, overlay = cam_overlay(image, cam)
    for kind, array in (("orig", model_input), ("cam", overlay)):
        png = display_picture(original) if kind == "orig" and original is not None else png_bytes(array)
        atomic_write_bytes(img_dir / f"{sha256}_{kind}.png", png)
        pictures[f"{kind}_file"] = f"img/{sha256}_{kind}.png"
        pictures[kind] = data_uri(png)
    return pictures


def _link(url: str) -> str | None:
    """url if it is a public http(s) URL, else None (shown as text: a loopback or private address, such as the demo's
    search site, is dead once its server stops, and any other scheme is never a link)."""
    return url if is_public_link(url) else None


def _example(row: pd.Series, pictures: dict[str, str]) -> dict[str, Any]:
    """Template fields of one selected row; the template escapes every string."""
    url = str(row["url"])
    return {
        "sha256": str(row["sha256"]),
        **pictures,
        "p_ai": f"{float(row['p_ai']):.3f}",
        "label": str(row["label"]),
        "predicted": str(row["predicted"]),
        "group": str(row["group"]),
        "keyword": str(row["keyword"]),
        "source": str(row["source"]),
        "url": url,
        "href": _link(url),
    }


def _copy_plots(out_dir: Path, plots: dict[str, Path]) -> list[dict[str, str]]:
    """Copy plot files into out_dir/plots/; return their names, relative paths and data: URIs."""
    copied: list[dict[str, str]] = []
    for name, source in plots.items():
        source = Path(source)
        if not _SAFE_NAME.match(name):
            raise ValueError(f"plot name must use letters, digits, '_', '.', '-', got {name!r}")
        if not source.is_file():
            raise FileNotFoundError(f"plot {name!r} not found at {source} (run the evaluate stage first)")
        relative = f"plots/{name}{source.suffix}"
        target = out_dir / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        copied.append({"name": name, "file": relative, "src": data_uri(target.read_bytes())})
    return copied


def _format_value(name: str, value: float) -> str:
    """A metric as text: counts without decimals, nan as n/a, the rest with 4 decimals."""
    if math.isnan(float(value)):
        return "n/a"
    if (name in ("tn", "fp", "fn", "tp") or name.startswith("n_")) and float(value).is_integer():
        return str(int(value))
    return f"{float(value):.4f}"


def _metric_rows(metrics: dict[str, float], limit: int | None = None) -> list[tuple[str, str]]:
    """Metrics in display order: headline ones first, the rest alphabetically; the first `limit` when given."""
    names = [name for name in HEADLINE_METRICS if name in metrics]
    names += sorted(name for name in metrics if name not in HEADLINE_METRICS)
    return [(name, _format_value(name, metrics[name])) for name in names[:limit]]


def _group_rows(per_group: pd.DataFrame) -> list[dict[str, str]]:
    """The worst groups as template rows (the first WORST_GROUPS of them)."""
    rows = per_group.head(WORST_GROUPS)
    return [
        {"group": str(r["group"]), "label": str(r["label"]), "n": str(int(r["n"])), "accuracy": f"{r['accuracy']:.3f}"}
        for _, r in rows.iterrows()
    ]


def render_html(context: dict[str, Any]) -> str:
    """Render templates/report.html with autoescaping on (all crawled text is escaped)."""
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    return environment.get_template("report.html").render(**context)


def _check_selected(images: torch.Tensor, selected: pd.DataFrame) -> None:
    """Raise ValueError unless images and selected rows line up and the rows have what the report shows."""
    check_images(images)
    if len(images) != len(selected):
        raise ValueError(f"images ({len(images)}) must hold one image per selected row ({len(selected)}), same order")
    missing = [name for name in _SELECTED_COLUMNS if name not in selected.columns]
    if missing:
        raise ValueError(f"selected rows are missing columns: {', '.join(missing)} (build them with select_examples)")


def build_report(
    out_dir: Path,
    model: torch.nn.Module,
    images: torch.Tensor,
    selected: pd.DataFrame,
    metrics: dict[str, float],
    per_group: pd.DataFrame,
    target_layer: torch.nn.Module,
    cam_method: str,
    title: str,
    plots: dict[str, Path] | None = None,
    run_info: dict[str, str] | None = None,
    cam_batch_size: int = 16,
    per_generator: pd.DataFrame | None = None,
    cam_target: str = "predicted",
    device: str = "cpu",
    originals: dict[str, Path] | None = None,
    warnings: list[dict[str, str]] | None = None,
    top: dict[str, str] | None = None,
    cell_totals: dict[str, int] | None = None,
    held_out_generator: str | None = None,
    reshape_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    review: dict[str, float] | None = None,
) -> Path:
    """Write out_dir/index.html (pictures embedded) with img/ and plots/ beside it; index.html is written last.

    The page leads with what matters: the headline numbers (top, see headline()), the warnings box (see
    report_warnings(); CAM attention warnings are added when warnings is None) and the learning curves (the plot
    named learning_curves). Then the details: summary metrics, plots, robustness (robust.* metrics), per-generator
    scores (per_generator; held_out_generator, a leave-one-generator-out run's, is marked), worst groups (per_group:
    every test group, the worst shown) and the Original | CAM pairs (originals: sha256 -> stored file; cell_totals:
    how many test images each cell holds, of which the selected rows are a part). All metrics are in a collapsed
    appendix. cam_target (report.cam_target): the CAMs explain each image's predicted
    class, or always "ai" / "real"; they are computed on device. reshape_transform: for a vision transformer's
    target layer, its tokens to the patch grid (learn.models.cam_reshape).
    """
    _check_selected(images, selected)
    out_dir = Path(out_dir)
    img_dir = out_dir / "img"
    img_dir.mkdir(parents=True, exist_ok=True)
    rows = selected.reset_index(drop=True)
    classes = cam_classes(rows, cam_target)
    cams = compute_cams(
        model, images, target_layer, cam_method, batch_size=cam_batch_size, target_class=classes, device=device,
        reshape_transform=reshape_transform,
    )  # fmt: skip
    sections: list[dict[str, Any]] = []
    originals = originals or {}
    for cell, _, _ in CELLS:
        examples = []
        for i in rows.index[rows["cell"] == cell]:
            sha256 = str(rows.loc[i, "sha256"])
            pictures = _write_pair(img_dir, sha256, images[i], cams[i], originals.get(sha256))
            examples.append(_example(rows.loc[i], pictures) | {"explains": CLASS_NAMES[classes[i]]})
        total = max(len(examples), (cell_totals or {}).get(cell, len(examples)))
        sections.append({"id": cell, "title": CELL_TITLES[cell], "examples": examples, "total": total})
    copied = _copy_plots(out_dir, plots or {})
    context = {
        "title": title,
        "cam_method": cam_method,
        "cam_target": CAM_TARGETS[cam_target],
        "top": top or {},
        "warnings": warnings if warnings is not None else report_warnings([], metrics),
        "learning_curves": [plot for plot in copied if plot["name"] == "learning_curves"],
        "run_info": sorted((str(k), str(v)) for k, v in (run_info or {}).items()),
        "metrics": _metric_rows(metrics, SUMMARY_METRICS),
        "all_metrics": _metric_rows(metrics),
        "plots": [plot for plot in copied if plot["name"] != "learning_curves"],
        "worst_groups": _group_rows(per_group),
        "n_groups": len(per_group),
        "sections": sections,
        "robustness": _robustness_rows(metrics),
        "robustness_how": ROBUSTNESS_DESCRIPTION,
        "generators": _generator_rows(per_generator, held_out_generator),
        "held_out_generator": held_out_generator or "",
        "review": review_rows(review or {}),
    }
    index = atomic_write_text(out_dir / "index.html", render_html(context))
    log.info("report written to %s (%d examples)", index, len(rows))
    return index
