"""Decode each image once into a resized uint8 CHW tensor cache (cache/tensors/s<size>/ab/<sha>.npy)."""

from __future__ import annotations

import io
import logging
import multiprocessing
import os
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageOps

from pipeline_lib.catalog import STATUS_OK
from pipeline_lib.validate import to_rgb
from pipeline_lib.workspace import Workspace, atomic_write_bytes

log = logging.getLogger(__name__)

POOL_THRESHOLD = 1000  # fewer missing tensors are decoded in-process: a spawn pool importing torch costs seconds
_CHUNK = 16


class PreprocessError(ValueError):
    """One or more images could not be decoded into tensors; the message names them."""


def _check_size(size: int) -> None:
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"image size must be a positive integer, got {size!r}")


def _check_sha(sha256: str) -> None:
    if not isinstance(sha256, str) or len(sha256) < 3 or not all(c in "0123456789abcdef" for c in sha256):
        raise ValueError(f"sha256 must be a lowercase hex digest, got {sha256!r}")


def tensor_path(workspace: Workspace, sha256: str, size: int) -> Path:
    """Cache location of one image's tensor: cache/tensors/s<size>/<sha[:2]>/<sha>.npy."""
    _check_sha(sha256)
    _check_size(size)
    return workspace.cache / "tensors" / f"s{size}" / sha256[:2] / f"{sha256}.npy"


def _resize_crop(image: Image.Image, size: int) -> Image.Image:
    """Shorter side to size (bilinear, antialiased), then a centred size x size crop."""
    width, height = image.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


def decode_image(path: Path, size: int) -> np.ndarray:
    """Decode an image file into a uint8 RGB array (3, size, size): EXIF-oriented, resized, centre-cropped."""
    _check_size(size)
    with Image.open(path) as image:
        if image.format == "JPEG":
            image.draft("RGB", (size, size))  # DCT scaling: decode at >= size, much faster for large photos
        image.load()
        oriented = ImageOps.exif_transpose(image)
        rgb = to_rgb(oriented)
    array = np.asarray(_resize_crop(rgb, size), dtype=np.uint8)
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def _write_array(target: Path, array: np.ndarray) -> None:
    """Save an array as .npy atomically."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    atomic_write_bytes(target, buffer.getvalue())


def _read_array(path: Path, size: int) -> np.ndarray | None:
    """A cached tensor, or None if it is missing or damaged (wrong shape/dtype, unreadable)."""
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, EOFError) as error:
        log.warning("cached tensor %s is unreadable (%s); decoding again", path, error)
        return None
    if array.dtype != np.uint8 or array.shape != (3, size, size):
        log.warning(
            "cached tensor %s has %s %s, expected uint8 (3,%d,%d); decoding again",
            path,
            array.dtype,
            array.shape,
            size,
            size,
        )
        return None
    return array


def _cache_one(job: tuple[str, str, int]) -> str:
    """Decode source into target (a pool job); return "" on success or an error text."""
    source, target, size = job
    try:
        _write_array(Path(target), decode_image(Path(source), size))
    except Exception as error:  # PIL raises many types; each becomes a named failure
        return f"{type(error).__name__}: {error}"
    return ""


def _split_rows(catalog: pd.DataFrame) -> pd.DataFrame:
    """Status-ok rows with a split assigned, one per sha256."""
    missing = [name for name in ("sha256", "path", "status", "split") if name not in catalog.columns]
    if missing:
        raise ValueError(f"catalog is missing columns: {', '.join(missing)}")
    rows = catalog[(catalog["status"] == STATUS_OK) & (catalog["split"].fillna("") != "")]
    return rows.drop_duplicates("sha256")


def _run_jobs(jobs: list[tuple[str, str, int]], workers: int | None) -> list[str]:
    """Run decode jobs in-process or in a spawn process pool; return one error text per job ("" = ok)."""
    n_workers = workers if workers is not None else (os.cpu_count() or 1)
    if n_workers < 1:
        raise ValueError(f"workers must be >= 1, got {n_workers}")
    if n_workers == 1 or len(jobs) < POOL_THRESHOLD:
        return [_cache_one(job) for job in jobs]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(n_workers, len(jobs)), mp_context=context) as pool:
        return list(pool.map(_cache_one, jobs, chunksize=_CHUNK))


def preprocess_images(workspace: Workspace, catalog: pd.DataFrame, size: int, workers: int | None = None) -> int:
    """Cache tensors of every ok image with a split (distinct sha); return how many were newly written."""
    _check_size(size)
    rows = _split_rows(catalog)
    jobs: list[tuple[str, str, int]] = []
    for sha256, relative in zip(rows["sha256"], rows["path"], strict=True):
        target = tensor_path(workspace, str(sha256), size)
        if target.exists():
            continue
        source = workspace.root / str(relative)
        if not source.is_file():
            raise FileNotFoundError(f"original of {sha256} not found at {source} (the store lost a file)")
        jobs.append((str(source), str(target), size))
    errors = _run_jobs(jobs, workers)
    failed = [f"{Path(job[0]).name}: {error}" for job, error in zip(jobs, errors, strict=True) if error]
    written = len(jobs) - len(failed)
    log.info("preprocess s%d: %d new tensors, %d cached, %d failed", size, written, len(rows) - len(jobs), len(failed))
    if failed:
        shown = "; ".join(failed[:5]) + (f" (+{len(failed) - 5} more)" if len(failed) > 5 else "")
        raise PreprocessError(f"{len(failed)} image(s) could not be decoded into tensors: {shown}")
    return written


def find_original(workspace: Workspace, sha256: str) -> Path:
    """The stored original of sha256 (store/ab/<sha>.<ext>); FileNotFoundError naming the folder if absent."""
    _check_sha(sha256)
    folder = workspace.store / sha256[:2]
    matches = sorted(p for p in folder.glob(f"{sha256}.*") if p.is_file()) if folder.is_dir() else []
    if not matches:
        raise FileNotFoundError(f"no stored original for {sha256} in {folder}")
    return matches[0]


def load_tensor(workspace: Workspace, sha256: str, size: int) -> np.ndarray:
    """One image's uint8 (3, size, size) array from the cache; decoded (and cached) when missing or damaged."""
    path = tensor_path(workspace, sha256, size)
    array = _read_array(path, size)
    if array is None:
        array = decode_image(find_original(workspace, sha256), size)
        _write_array(path, array)
    return array


def load_tensors(workspace: Workspace, shas: Iterable[str], size: int) -> torch.Tensor:
    """uint8 tensor [N, 3, size, size] of the images in the given order (what evaluate/report expect)."""
    _check_size(size)
    arrays = [load_tensor(workspace, str(sha), size) for sha in shas]
    if not arrays:
        return torch.empty((0, 3, size, size), dtype=torch.uint8)
    return torch.from_numpy(np.stack(arrays))
