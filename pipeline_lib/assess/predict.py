"""Score image files with a trained model: p_ai, a label and a verdict per file, optional CAM overlays, errors.

A checkpoint may have a calibration file beside it (<model>.calibration.json, written by the pipeline's evaluate
stage): the temperature fitted on the validation split and the normalisation policy the model was trained with.
p_ai is then sigmoid(logit margin / T) and files are decoded with that policy; without the file T = 1.
The verdict is ai / real / uncertain with the band from config calibration (uncertain_low, uncertain_high).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from pipeline_lib.acquire.validate import check_header
from pipeline_lib.assess import cam as cam_lib
from pipeline_lib.assess.calibration import apply_temperature, check_temperature, verdicts
from pipeline_lib.assess.evaluate import borrowed_model, predict_logits, softmax_p_ai
from pipeline_lib.assess.model_calibration import ModelCalibration, parse_calibration
from pipeline_lib.core.config import IngestConfig, NormalizeConfig
from pipeline_lib.core.workspace import atomic_write_bytes, atomic_write_text
from pipeline_lib.learn import models
from pipeline_lib.learn.preprocess import decode_image

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".jfif", ".avif", ".heic"}
)
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
CALIBRATION_SUFFIX = ".calibration.json"
POLICY_REASONS = frozenset({"decompression_bomb", "too_small", "animated", "unsupported_mode"})
DEFAULT_BAND = (0.35, 0.65)  # config calibration.uncertain_low / uncertain_high defaults


def calibration_path(checkpoint: Path) -> Path:
    """<folder>/<model stem>.calibration.json beside a checkpoint (best.pt -> best.calibration.json)."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.stem + CALIBRATION_SUFFIX)


def write_calibration(checkpoint: Path, calibration: ModelCalibration) -> Path:
    """Write the calibration file beside checkpoint atomically; return its path."""
    check_temperature(calibration.temperature, f"calibration of {checkpoint}")
    text = json.dumps(calibration.as_dict(), indent=2, sort_keys=True, allow_nan=False) + "\n"
    return atomic_write_text(calibration_path(checkpoint), text)


def read_calibration(checkpoint: Path) -> ModelCalibration:
    """The calibration beside checkpoint; ModelCalibration() (T = 1, no normalisation) when there is none.

    A malformed file raises ValueError naming it (a silently ignored temperature would mis-state p_ai).
    """
    path = calibration_path(checkpoint)
    if not path.is_file():
        return ModelCalibration()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ValueError(f"calibration file {path} is unreadable: {error}") from None
    return parse_calibration(text, f"calibration file {path}")


@dataclass(frozen=True)
class PredictionRow:
    """One file's result: p_ai, label and verdict when it was scored, error when it was not; cam = overlay file.

    p_ai is calibrated (temperature applied) and p_ai_raw is the model's own softmax; label thresholds p_ai,
    verdict applies the uncertain band (ai / real / uncertain).
    """

    path: str
    p_ai: float | None
    label: str | None
    error: str | None
    cam: str | None = None
    verdict: str | None = None
    p_ai_raw: float | None = None

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


def _decode(
    path: Path, size: int, policy: NormalizeConfig | None, ingest: IngestConfig | None = None
) -> tuple[np.ndarray | None, str | None]:
    """(uint8 CHW array, None) or (None, a clear error text) for one file; ingest's policy is checked first."""
    if not path.exists():
        return None, "file not found"
    if not path.is_file():
        return None, "not a regular file"
    if ingest is not None:
        refused = check_header(path, ingest.min_side, ingest.max_pixels, ingest.animated)
        if refused in POLICY_REASONS:  # unreadable files get the decoder's own error below
            return None, f"refused by the ingest policy: {refused} ({_policy_words(refused, ingest)})"
    try:
        sha = hashlib.sha256(path.read_bytes()).hexdigest() if policy is not None else None
        return decode_image(path, size, policy, sha), None
    except Exception as error:  # PIL raises many types for bad files; each becomes a per-file error
        return None, f"unreadable image ({type(error).__name__}: {error})"


def _policy_words(reason: str, ingest: IngestConfig) -> str:
    """The limit behind a refusal, in words."""
    limits = {
        "decompression_bomb": f"more than ingest.max_pixels={ingest.max_pixels} pixels",
        "too_small": f"a side shorter than ingest.min_side={ingest.min_side}",
        "animated": "animated, and ingest.animated=reject",
        "unsupported_mode": "a pixel mode with no conversion to RGB",
    }
    return limits[reason]


def cam_file_name(path: Path) -> str:
    """Overlay file name for an input: <safe stem>-<8 hex of the full path>.png (unique, filesystem-safe)."""
    stem = _UNSAFE.sub("_", path.stem)[:80] or "image"
    tag = hashlib.sha256(str(path.resolve()).encode("utf-8")).hexdigest()[:8]
    return f"{stem}-{tag}.png"


def _write_cams(
    model: torch.nn.Module,
    images: torch.Tensor,
    paths: Sequence[Path],
    cam_dir: Path,
    cam_method: str,
    classes: Sequence[int] | None = None,
    device: str = "cpu",
) -> list[str]:
    """CAM overlays of a batch (explaining classes, one index per image; default "ai"), computed on device, written
    as PNG files into cam_dir; return their paths."""
    target = list(classes) if classes is not None else 1
    layer = models.target_layer(model)
    maps = cam_lib.compute_cams(
        model, images, layer, method=cam_method, batch_size=len(images), target_class=target, device=device,
        reshape_transform=models.cam_reshape(model),
    )  # fmt: skip
    written: list[str] = []
    for image, cam, path in zip(images, maps, paths, strict=True):
        _, overlay = cam_lib.cam_overlay(image, cam)
        target = cam_dir / cam_file_name(path)
        atomic_write_bytes(target, cam_lib.png_bytes(overlay))
        written.append(str(target))
    return written


@dataclass(frozen=True)
class _Scoring:
    """How a batch is scored: input size, decision threshold, uncertain band, calibration, CAM output."""

    size: int
    threshold: float
    band: tuple[float, float]
    calibration: ModelCalibration
    cam_dir: Path | None
    cam_method: str
    cam_target: str = "predicted"
    device: str = "cpu"
    ingest: IngestConfig | None = None


def _score_batch(model: torch.nn.Module, batch: Sequence[Path], how: _Scoring) -> list[PredictionRow]:
    """Decode, score and (optionally) explain one batch; unreadable files become error rows in place."""
    decoded = [_decode(path, how.size, how.calibration.normalize, how.ingest) for path in batch]
    good = [i for i, (array, _) in enumerate(decoded) if array is not None]
    scores: dict[int, tuple[float, float, str]] = {}
    cams: dict[int, str] = {}
    if good:
        images = torch.from_numpy(np.stack([decoded[i][0] for i in good]))
        logits = predict_logits(model, images, batch_size=len(good), device=how.device)
        p_ai = apply_temperature(logits, how.calibration.temperature)
        said = verdicts(p_ai, *how.band)
        raw = softmax_p_ai(logits)
        scores = {i: (float(p), float(r), str(v)) for i, p, r, v in zip(good, p_ai, raw, said, strict=True)}
        if how.cam_dir is not None:
            predicted = pd.DataFrame({"predicted": np.where(p_ai >= how.threshold, "ai", "real")})
            classes = cam_lib.cam_classes(predicted, how.cam_target)
            paths = [batch[i] for i in good]
            files = _write_cams(model, images, paths, how.cam_dir, how.cam_method, classes, how.device)
            cams = dict(zip(good, files, strict=True))
    rows = []
    for i, path in enumerate(batch):
        if i in scores:
            p_ai, raw, verdict = scores[i]
            label = "ai" if p_ai >= how.threshold else "real"
            rows.append(PredictionRow(str(path), p_ai, label, None, cams.get(i), verdict, raw))
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
    calibration: ModelCalibration | None = None,
    band: tuple[float, float] = DEFAULT_BAND,
    cam_target: str = "predicted",
    device: str = "cpu",
    ingest: IngestConfig | None = None,
) -> list[PredictionRow]:
    """One PredictionRow per file (folders walked recursively), in order, decoded at meta["image_size"], batched.

    A file that cannot be read or decoded, or that ingest's validation policy (pixel bound, minimum size,
    animation) refuses by its header, gets an error row and the others are still scored.
    With cam_dir, an overlay PNG of the CAM is written there for every scored file; cam_target (report.cam_target)
    says which class it explains: the file's predicted label (default), or always "ai" / "real".
    calibration: temperature and normalisation of the model (read_calibration; default T = 1, no normalisation);
    band: (uncertain_low, uncertain_high) of the verdict; device: where the model scores (and explains) each batch
    (the model is moved there once and handed back where it was).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be strictly between 0 and 1, got {threshold}")
    if cam_method not in cam_lib.CAM_METHODS:
        raise ValueError(f"cam_method must be one of {', '.join(cam_lib.CAM_METHODS)}, got {cam_method!r}")
    if cam_target not in cam_lib.CAM_TARGETS:
        raise ValueError(f"cam_target must be one of {', '.join(cam_lib.CAM_TARGETS)}, got {cam_target!r}")
    low, high = band
    if not 0 < low < high < 1:
        raise ValueError(f"uncertain band must satisfy 0 < uncertain_low < uncertain_high < 1, got {band}")
    size = _image_size(meta)
    files = collect_paths(paths)
    if cam_dir is not None:
        cam_dir = Path(cam_dir)
        cam_dir.mkdir(parents=True, exist_ok=True)
    how = _Scoring(
        size, threshold, (low, high), calibration or ModelCalibration(), cam_dir, cam_method, cam_target, device, ingest
    )
    rows: list[PredictionRow] = []
    with borrowed_model(model, device):
        for start in range(0, len(files), batch_size):
            rows.extend(_score_batch(model, files[start : start + batch_size], how))
    failed = sum(row.error is not None for row in rows)
    log.info("predicted %d file(s), %d not readable", len(rows) - failed, failed)
    return rows
