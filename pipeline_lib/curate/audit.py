"""Format-shortcut audit: can a model that sees only file metadata predict the label?

Crawled real photos are mostly camera JPEGs with EXIF; generator output is mostly PNG/WebP at a few fixed sizes
without EXIF. A detector can learn the container instead of the image. `metadata_features` describes each stored
file by metadata only (format, size, aspect ratio, bytes per pixel, EXIF present, JPEG quality estimate);
`audit_shortcuts` fits a small gradient-boosting model on them with stratified k-fold cross-validation and reports
its ROC-AUC and most important features; `audit_verdict` turns that into ok / warn / fail.
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.model_selection import StratifiedKFold, cross_val_score

from pipeline_lib.core.catalog import STATUS_OK
from pipeline_lib.core.config import LABELS
from pipeline_lib.core.workspace import Workspace

log = logging.getLogger(__name__)

FEATURE_COLUMNS: tuple[str, ...] = (
    "format_jpeg",
    "format_png",
    "format_webp",
    "format_other",
    "width",
    "height",
    "aspect_ratio",
    "bytes_per_pixel",
    "exif_present",
    "jpeg_quality",
)
MISSING_QUALITY = -1.0  # non-JPEG files (or tables that cannot be read) get this instead of NaN
MIN_PER_CLASS = 2  # fewer samples of a class: no cross-validation possible

# libjpeg's standard luminance quantisation table (ITU T.81 K.1), natural (row-major) order as PIL reports it.
STD_LUMINANCE = np.array(
    [
        [16, 11, 10, 16, 24, 40, 51, 61],
        [12, 12, 14, 19, 26, 58, 60, 55],
        [14, 13, 16, 24, 40, 57, 69, 56],
        [14, 17, 22, 29, 51, 87, 80, 62],
        [18, 22, 37, 56, 68, 109, 103, 77],
        [24, 35, 55, 64, 81, 104, 113, 92],
        [49, 64, 78, 87, 103, 121, 120, 101],
        [72, 92, 95, 98, 112, 100, 103, 99],
    ],
    dtype=np.float64,
).ravel()


class AuditError(ValueError):
    """The audit cannot run on this input; the message says why."""


def libjpeg_table(quality: int) -> np.ndarray:
    """The luminance table libjpeg writes for quality 1..100 (jpeg_quality_scaling, clamped to 1..255)."""
    scale = 5000 / quality if quality < 50 else 200 - 2 * quality
    return np.clip(np.floor((STD_LUMINANCE * scale + 50) / 100), 1, 255)


_LIBJPEG_TABLES = np.stack([libjpeg_table(q) for q in range(1, 101)])


def estimate_jpeg_quality(table: list[int] | np.ndarray) -> float:
    """Quality 1..100 whose libjpeg luminance table is closest (mean absolute difference) to table 0 of a JPEG."""
    values = np.asarray(table, dtype=np.float64).ravel()
    if values.size != 64:
        raise ValueError(f"a JPEG quantisation table has 64 entries, got {values.size}")
    errors = np.abs(_LIBJPEG_TABLES - values).mean(axis=1)
    return float(np.argmin(errors) + 1)


def file_metadata(source: Path | bytes) -> dict[str, float]:
    """Metadata features of one image file (path or bytes), from its header only (no pixel decode)."""
    data = source if isinstance(source, bytes) else None
    n_bytes = len(data) if data is not None else Path(source).stat().st_size
    try:
        with Image.open(io.BytesIO(data) if data is not None else Path(source)) as image:
            fmt = (image.format or "").upper()
            width, height = image.size
            exif_present = len(image.getexif()) > 0
            quality = MISSING_QUALITY
            if fmt in ("JPEG", "MPO") and getattr(image, "quantization", None):
                quality = estimate_jpeg_quality(image.quantization[min(image.quantization)])
    except (UnidentifiedImageError, OSError) as error:
        name = "<bytes>" if data is not None else str(source)
        raise AuditError(f"cannot read image header of {name}: {error}") from None
    fmt = "JPEG" if fmt == "MPO" else fmt
    return {
        "format_jpeg": float(fmt == "JPEG"),
        "format_png": float(fmt == "PNG"),
        "format_webp": float(fmt == "WEBP"),
        "format_other": float(fmt not in ("JPEG", "PNG", "WEBP")),
        "width": float(width),
        "height": float(height),
        "aspect_ratio": width / height if height else math.nan,
        "bytes_per_pixel": n_bytes / (width * height) if width * height else math.nan,
        "exif_present": float(exif_present),
        "jpeg_quality": quality,
    }


def metadata_features(workspace: Workspace, catalog: pd.DataFrame) -> pd.DataFrame:
    """One row of FEATURE_COLUMNS per usable (status ok) catalog row, indexed by sha256, read from stored files.

    Pass the training split's rows to audit what training will see. Missing stored files raise AuditError.
    """
    missing = [c for c in ("sha256", "path", "status") if c not in catalog.columns]
    if missing:
        raise AuditError(f"catalog is missing columns: {', '.join(missing)}")
    rows = catalog[catalog["status"] == STATUS_OK]
    records = []
    for sha, rel in zip(rows["sha256"], rows["path"], strict=True):
        path = workspace.root / str(rel)
        if not path.is_file():
            raise AuditError(f"stored file of {sha} is missing: {path}")
        records.append(file_metadata(path))
    features = pd.DataFrame(records, columns=list(FEATURE_COLUMNS), index=pd.Index(rows["sha256"], name="sha256"))
    return features.astype("float64")


@dataclass(frozen=True)
class AuditResult:
    """Cross-validated ROC-AUC of the metadata-only model, its top features and the sample counts."""

    roc_auc: float
    top_features: list[tuple[str, float]]
    n: int
    n_per_label: dict[str, int] = field(default_factory=dict)
    folds: int = 0
    note: str = ""

    def metrics(self) -> dict[str, float]:
        """Flat metrics for MLflow: audit.roc_auc, audit.n, audit.importance.<feature>."""
        out = {"audit.roc_auc": self.roc_auc, "audit.n": float(self.n), "audit.folds": float(self.folds)}
        out.update({f"audit.importance.{name}": value for name, value in self.top_features})
        return out


def _binary_labels(labels: pd.Series | np.ndarray | list) -> np.ndarray:
    """Labels as 0 (real) / 1 (ai) from 'real'/'ai' strings or 0/1 numbers."""
    values = np.asarray(labels, dtype=object)
    if all(isinstance(v, str) for v in values):
        bad = sorted({v for v in values if v not in LABELS})
        if bad:
            raise AuditError(f"labels must be one of {LABELS}, got {bad}")
        return (values == "ai").astype(np.int64)
    numeric = np.asarray(labels, dtype=np.float64)
    if not np.isin(numeric, (0.0, 1.0)).all():
        raise AuditError("numeric labels must be 0 (real) or 1 (ai)")
    return numeric.astype(np.int64)


def audit_shortcuts(features: pd.DataFrame, labels: pd.Series | np.ndarray | list, seed: int = 0) -> AuditResult:
    """Fit gradient boosting on metadata alone; ROC-AUC by stratified k-fold (k = min(5, smallest class)).

    With fewer than 2 samples of a class the AUC is NaN and `note` says why (nothing to cross-validate).
    """
    y = _binary_labels(labels)
    if len(features) != len(y):
        raise AuditError(f"features ({len(features)} rows) and labels ({len(y)}) differ in length")
    unknown = [c for c in features.columns if c not in FEATURE_COLUMNS]
    if unknown:
        raise AuditError(f"unknown feature columns: {', '.join(map(str, unknown))}")
    x = features.reindex(columns=list(FEATURE_COLUMNS)).astype("float64")
    x = x.fillna(MISSING_QUALITY).to_numpy()
    counts = {"real": int((y == 0).sum()), "ai": int((y == 1).sum())}
    smallest = min(counts.values())
    if smallest < MIN_PER_CLASS:
        note = f"audit skipped: need >= {MIN_PER_CLASS} images per label, got {counts}"
        log.warning(note)
        return AuditResult(math.nan, [], len(y), counts, 0, note)
    k = min(5, smallest)
    model = GradientBoostingClassifier(n_estimators=100, max_depth=2, learning_rate=0.1, random_state=seed)
    folds = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    scores = cross_val_score(model, x, y, cv=folds, scoring="roc_auc")
    model.fit(x, y)
    ranked = sorted(zip(FEATURE_COLUMNS, model.feature_importances_, strict=True), key=lambda p: (-p[1], p[0]))
    top = [(name, round(float(value), 6)) for name, value in ranked if value > 0][:5]
    result = AuditResult(float(np.mean(scores)), top, len(y), counts, k)
    log.info("format-shortcut audit: roc_auc=%.3f over %d images (%d folds); top %s", result.roc_auc, len(y), k, top)
    return result


def audit_verdict(
    result: AuditResult, warn_above: float, strict: bool, normalized: bool = False
) -> tuple[str, str]:
    """('ok' | 'warn' | 'fail', message): above warn_above warns, or fails in strict mode; skipped audits warn.

    `normalized`: the features were read from re-encoded files, so format and EXIF are gone; what still separates
    the labels is compressibility or size, which may be the content itself (noise, texture) or a size shortcut.
    """
    if not 0.5 <= warn_above <= 1:
        raise ValueError(f"audit.warn_above must be in [0.5, 1], got {warn_above}")
    if math.isnan(result.roc_auc):
        return "warn", result.note or "audit could not be computed"
    top = ", ".join(f"{name} {value:.2f}" for name, value in result.top_features[:3]) or "none"
    summary = f"metadata-only model ROC-AUC {result.roc_auc:.3f} on {result.n} images (top features: {top})"
    if result.roc_auc <= warn_above:
        return "ok", summary
    advice = (
        "even after re-encoding, labels are predictable from size or compressibility (bytes per pixel follows noise "
        "and texture): check that this is the content and not the source, e.g. set preprocess.normalize.resize_shorter"
        if normalized
        else "labels are predictable from file format/size/EXIF; set preprocess.normalize.mode=jpeg"
    )
    return ("fail" if strict else "warn"), f"{summary} exceeds audit.warn_above={warn_above}: {advice}"


def audit_rows(workspace: Workspace, rows: pd.DataFrame, seed: int = 0) -> AuditResult:
    """metadata_features + audit_shortcuts on catalog rows (usable rows only; labels from the catalog)."""
    features = metadata_features(workspace, rows)
    labels = rows.loc[rows["status"] == STATUS_OK, "label"].astype(str).to_numpy()
    return audit_shortcuts(features, labels, seed=seed)
