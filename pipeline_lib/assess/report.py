"""The evaluation report: Grad-CAM maps and a self-contained HTML folder (index.html + img/ + plots/).

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
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jinja2
import numpy as np
import pandas as pd
import torch
from PIL import Image
from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, ScoreCAM
from pytorch_grad_cam.base_cam import BaseCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from pipeline_lib.assess.cam_summary import cam_attention_summary, text_mask
from pipeline_lib.assess.evaluate import CLASS_NAMES, borrowed_model, check_images, to_float
from pipeline_lib.core.progress import progress
from pipeline_lib.core.workspace import atomic_write_bytes, atomic_write_text
from pipeline_lib.learn.normalize import ROBUSTNESS_DESCRIPTION, ROBUSTNESS_VARIANTS

log = logging.getLogger(__name__)

CAM_METHODS: dict[str, type[BaseCAM]] = {
    "gradcam": GradCAM,
    "gradcam++": GradCAMPlusPlus,
    "eigencam": EigenCAM,
    "scorecam": ScoreCAM,
}

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
CAM_TARGETS: dict[str, str] = {  # report.cam_target -> how the report says it
    "predicted": "each image's predicted class",
    "ai": "the \u201cai\u201d class",
    "real": "the \u201creal\u201d class",
}
SUMMARY_METRICS = 12  # how many of HEADLINE_METRICS the summary table shows; all metrics are in the appendix
SMALL_SAMPLE_CI_WIDTH = 0.1  # a 95% interval of accuracy wider than this gets a small-sample warning
DISPLAY_SIDE = 256  # longest side of the "Original" pictures (from the store, not the model input)
WORST_GROUPS = 20
AUDIT_NOTE = "format-shortcut audit"  # how the split stage's audit verdict note starts
HEALTH_NOTE = "crawl health:"  # how the crawl stage's health notes start
CAM_FLAG_ABOVE = 0.5  # a CAM attention share (border or text) above this is flagged
CAM_BORDER_FRACTION = 0.1
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_SELECTED_COLUMNS = ("sha256", "group", "label", "source", "url", "keyword", "p_ai", "predicted", "cell")


def compute_cams(
    model: torch.nn.Module,
    images: torch.Tensor,
    target_layer: torch.nn.Module,
    method: str = "gradcam",
    batch_size: int = 16,
    target_class: int | Sequence[int] = 1,
    device: str = "cpu",
) -> np.ndarray:
    """CAM maps float32 [N, H, W] in [0, 1] explaining target_class (1 = ai, 0 = real), or one class index per
    image; the model is left as given."""
    check_images(images)
    if method not in CAM_METHODS:
        raise ValueError(f"report.cam_method must be one of {', '.join(CAM_METHODS)}, got {method!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    classes = [target_class] * len(images) if isinstance(target_class, int) else [int(c) for c in target_class]
    if len(classes) != len(images):
        raise ValueError(f"target_class must hold one class per image ({len(images)}), got {len(classes)}")
    if any(c < 0 for c in classes):
        raise ValueError(f"target_class must be a class index >= 0 (0 = real, 1 = ai), got {target_class}")
    height, width = images.shape[-2:]
    if len(images) == 0:
        return np.empty((0, height, width), dtype=np.float32)
    maps: list[np.ndarray] = []
    # Gradients must flow even if the caller froze the backbone or is inside inference_mode.
    with torch.inference_mode(False), torch.enable_grad(), borrowed_model(model, device, requires_grad=True):
        with CAM_METHODS[method](model=model, target_layers=[target_layer]) as cam:
            starts = range(0, len(images), batch_size)
            for start in progress(starts, len(images), method, step=batch_size):
                batch = to_float(images[start : start + batch_size], device)
                targets = [ClassifierOutputTarget(c) for c in classes[start : start + batch_size]]
                maps.append(np.asarray(cam(input_tensor=batch, targets=targets), dtype=np.float32))
    log.debug("computed %s maps for %d images", method, len(images))
    return np.clip(np.nan_to_num(np.concatenate(maps), nan=0.0), 0.0, 1.0)


def cam_attention_metrics(
    model: torch.nn.Module,
    images: torch.Tensor,
    target_layer: torch.nn.Module,
    method: str = "gradcam",
    batch_size: int = 16,
    flag_above: float = CAM_FLAG_ABOVE,
    device: str = "cpu",
) -> dict[str, float]:
    """CAM attention over images: cam.border_share_mean, cam.text_share_mean, cam.n_border_flagged, ... (floats).

    The share of each image's CAM mass (explaining "ai") on the border band and on text-like regions; an image is
    flagged when a share exceeds flag_above. A uniform map puts 0.36 of its mass on the border. The CAMs are
    computed on device in batches; the text masks (an image heuristic) on the CPU.
    """
    check_images(images)
    if len(images) == 0:
        return {"cam.n": 0.0}
    cams = compute_cams(model, images, target_layer, method=method, batch_size=batch_size, device=device)
    masks = [text_mask(np.ascontiguousarray(image.permute(1, 2, 0).cpu().numpy())) for image in images]
    summary = cam_attention_summary(cams, CAM_BORDER_FRACTION, flag_above, text_masks=masks)
    keys = ("border_share_mean", "text_share_mean", "n_border_flagged", "n_text_flagged", "n", "flag_above")
    return {f"cam.{key}": float(summary[key]) for key in keys}


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


def _generator_rows(per_generator: pd.DataFrame | None) -> list[dict[str, str]]:
    """stats.per_generator_metrics rows as template rows."""
    if per_generator is None or per_generator.empty:
        return []
    return [
        {
            "generator": str(r["generator"]),
            "n": str(int(r["n"])),
            "n_ai": str(int(r["n_ai"])),
            "accuracy": _format_value("accuracy", r["accuracy"]),
            "average_precision": _format_value("ap", r["average_precision"]),
            "roc_auc": _format_value("roc_auc", r["roc_auc"]),
        }
        for _, r in per_generator.iterrows()
    ]


def _confidence(predictions: pd.DataFrame) -> pd.Series:
    """Probability the model gave to the class it predicted."""
    p_ai = predictions["p_ai"].astype(float)
    return p_ai.where(predictions["predicted"] == "ai", 1.0 - p_ai)


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


def png_bytes(array: np.ndarray) -> bytes:
    """Encode an HxWx3 uint8 array as PNG."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri(png: bytes) -> str:
    """A data: URI of PNG bytes (what the report's <img> tags use)."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def cam_overlay(image: torch.Tensor, cam: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(original HxWx3 uint8, CAM heat map blended over it HxWx3 uint8) for one uint8 CHW image."""
    rgb = image.permute(1, 2, 0).cpu().numpy()
    overlay = show_cam_on_image(rgb.astype(np.float32) / 255.0, cam, use_rgb=True)
    return rgb, overlay


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
    """url if it is safe to put in an href (http/https only), else None (shown as text)."""
    return url if urlsplit(url).scheme.lower() in ("http", "https") else None


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
    """The worst groups as template rows."""
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


def cam_classes(selected: pd.DataFrame, cam_target: str) -> list[int]:
    """The class index each selected row's CAM explains: its predicted class, or always ai or real (cam_target)."""
    if cam_target not in CAM_TARGETS:
        raise ValueError(f"report.cam_target must be one of {', '.join(CAM_TARGETS)}, got {cam_target!r}")
    if cam_target != "predicted":
        return [CLASS_NAMES.index(cam_target)] * len(selected)
    return [CLASS_NAMES.index(str(label)) for label in selected["predicted"]]


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
) -> Path:
    """Write out_dir/index.html (pictures embedded) with img/ and plots/ beside it; index.html is written last.

    The page leads with what matters: the headline numbers (top, see headline()), the warnings box (see
    report_warnings(); CAM attention warnings are added when warnings is None) and the learning curves (the plot
    named learning_curves). Then the details: summary metrics, plots, robustness (robust.* metrics), per-generator
    scores (per_generator), worst groups and the Original | CAM pairs (originals: sha256 -> stored file). All
    metrics are in a collapsed appendix. cam_target (report.cam_target): the CAMs explain each image's predicted
    class, or always "ai" / "real"; they are computed on device.
    """
    _check_selected(images, selected)
    out_dir = Path(out_dir)
    img_dir = out_dir / "img"
    img_dir.mkdir(parents=True, exist_ok=True)
    rows = selected.reset_index(drop=True)
    classes = cam_classes(rows, cam_target)
    cams = compute_cams(
        model, images, target_layer, cam_method, batch_size=cam_batch_size, target_class=classes, device=device
    )
    sections: list[dict[str, Any]] = []
    originals = originals or {}
    for cell, _, _ in CELLS:
        examples = []
        for i in rows.index[rows["cell"] == cell]:
            sha256 = str(rows.loc[i, "sha256"])
            pictures = _write_pair(img_dir, sha256, images[i], cams[i], originals.get(sha256))
            examples.append(_example(rows.loc[i], pictures) | {"explains": CLASS_NAMES[classes[i]]})
        sections.append({"id": cell, "title": CELL_TITLES[cell], "examples": examples})
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
        "generators": _generator_rows(per_generator),
    }
    index = atomic_write_text(out_dir / "index.html", render_html(context))
    log.info("report written to %s (%d examples)", index, len(rows))
    return index
