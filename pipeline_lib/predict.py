"""Score image files with a trained model: p_ai and a label per file, optional CAM overlays, per-file errors."""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline_lib import models, report
from pipeline_lib.evaluate import predict_probabilities
from pipeline_lib.preprocess import decode_image
from pipeline_lib.workspace import atomic_write_bytes

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".jfif", ".avif", ".heic"}
)
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class PredictionRow:
    """One file's result: p_ai and label when it was scored, error when it was not; cam = overlay file or None."""

    path: str
    p_ai: float | None
    label: str | None
    error: str | None
    cam: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def collect_paths(paths: Iterable[Path]) -> list[Path]:
    """Files as given (any extension: a non-image gets a per-file error) and image files under folders, recursively.

    Folders are walked in sorted order; a path given twice is scored once.
    """
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found.extend(
                sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            )
        else:
            found.append(path)
    return list(dict.fromkeys(found))


def _image_size(meta: dict[str, Any]) -> int:
    """meta["image_size"] as a positive int; ValueError naming the key otherwise."""
    size = meta.get("image_size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"model meta must give image_size as a positive integer, got {size!r}")
    return size


def _decode(path: Path, size: int) -> tuple[np.ndarray | None, str | None]:
    """(uint8 CHW array, None) or (None, a clear error text) for one file."""
    if not path.exists():
        return None, "file not found"
    if not path.is_file():
        return None, "not a regular file"
    try:
        return decode_image(path, size), None
    except Exception as error:  # PIL raises many types for bad files; each becomes a per-file error
        return None, f"unreadable image ({type(error).__name__}: {error})"


def cam_file_name(path: Path) -> str:
    """Overlay file name for an input: <safe stem>-<8 hex of the full path>.png (unique, filesystem-safe)."""
    stem = _UNSAFE.sub("_", path.stem)[:80] or "image"
    tag = hashlib.sha256(str(path.resolve()).encode("utf-8")).hexdigest()[:8]
    return f"{stem}-{tag}.png"


def _write_cams(
    model: torch.nn.Module, images: torch.Tensor, paths: Sequence[Path], cam_dir: Path, cam_method: str
) -> list[str]:
    """CAM overlays (explaining "ai") of a batch written as PNG files into cam_dir; return their paths."""
    maps = report.compute_cams(model, images, models.target_layer(model), method=cam_method, batch_size=len(images))
    written: list[str] = []
    for image, cam, path in zip(images, maps, paths, strict=True):
        _, overlay = report.cam_overlay(image, cam)
        target = cam_dir / cam_file_name(path)
        atomic_write_bytes(target, report.png_bytes(overlay))
        written.append(str(target))
    return written


def _score_batch(
    model: torch.nn.Module,
    batch: Sequence[Path],
    size: int,
    threshold: float,
    cam_dir: Path | None,
    cam_method: str,
) -> list[PredictionRow]:
    """Decode, score and (optionally) explain one batch; unreadable files become error rows in place."""
    decoded = [_decode(path, size) for path in batch]
    good = [i for i, (array, _) in enumerate(decoded) if array is not None]
    scores: dict[int, float] = {}
    cams: dict[int, str] = {}
    if good:
        images = torch.from_numpy(np.stack([decoded[i][0] for i in good]))
        p_ai = predict_probabilities(model, images, batch_size=len(good))
        scores = {i: float(p) for i, p in zip(good, p_ai, strict=True)}
        if cam_dir is not None:
            files = _write_cams(model, images, [batch[i] for i in good], cam_dir, cam_method)
            cams = dict(zip(good, files, strict=True))
    rows = []
    for i, path in enumerate(batch):
        if i in scores:
            label = "ai" if scores[i] >= threshold else "real"
            rows.append(PredictionRow(str(path), scores[i], label, None, cams.get(i)))
        else:
            log.warning("not scored: %s: %s", path, decoded[i][1])
            rows.append(PredictionRow(str(path), None, None, decoded[i][1]))
    return rows


def predict_files(
    model: torch.nn.Module,
    meta: dict[str, Any],
    paths: Iterable[Path],
    batch_size: int = 32,
    cam_dir: Path | None = None,
    cam_method: str = "gradcam",
    threshold: float = 0.5,
) -> list[PredictionRow]:
    """One PredictionRow per file (folders walked recursively), in order, decoded at meta["image_size"], batched.

    A file that cannot be read or decoded gets an error row and the others are still scored.
    With cam_dir, an overlay PNG of the CAM (explaining "ai") is written there for every scored file.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be strictly between 0 and 1, got {threshold}")
    if cam_method not in report.CAM_METHODS:
        raise ValueError(f"cam_method must be one of {', '.join(report.CAM_METHODS)}, got {cam_method!r}")
    size = _image_size(meta)
    files = collect_paths(paths)
    if cam_dir is not None:
        cam_dir = Path(cam_dir)
        cam_dir.mkdir(parents=True, exist_ok=True)
    rows: list[PredictionRow] = []
    for start in range(0, len(files), batch_size):
        rows.extend(_score_batch(model, files[start : start + batch_size], size, threshold, cam_dir, cam_method))
    failed = sum(row.error is not None for row in rows)
    log.info("predicted %d file(s), %d not readable", len(rows) - failed, failed)
    return rows
