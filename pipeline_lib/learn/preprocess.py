"""Decode each image once into a resized uint8 CHW tensor cache (cache/tensors/s<size>-<code>/ab/<sha>.npy).

<code> is the digest of decode_image and the code it reaches (code_index.producer_code): a change of the decoding
code writes every tensor again, into a new folder, on the next run. With a normalisation policy (config
preprocess.normalize, mode jpeg) the image is re-encoded first (normalize.normalize_image: strip metadata, optional
resize, JPEG round-trip) and the tensor is cached under cache/tensors/s<size>-<policy_key>-<code>/ab/<sha>.npy;
policy None or mode 'none' keeps the plain folder.
"""

from __future__ import annotations

import io
import logging
import multiprocessing
import os
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
import pandas as pd
from PIL import Image, ImageOps

from pipeline_lib.acquire.validate import to_rgb
from pipeline_lib.core.catalog import STATUS_OK
from pipeline_lib.core.code_index import producer_code
from pipeline_lib.core.config import NormalizeConfig
from pipeline_lib.core.progress import progress
from pipeline_lib.core.workspace import Workspace, atomic_write_bytes
from pipeline_lib.learn.normalize import degrade_file, image_rng, normalize_image, normalized_bytes, policy_key

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# Fewer missing tensors are decoded in-process. The spawn pool's workers import no torch and start in ~0.5 s; on
# 2 cores the pool breaks even at ~400 images of 1024x768 (1.49 s vs 1.60 s in-process).
POOL_THRESHOLD = 400
_CHUNK = 16


class PreprocessError(ValueError):
    """One or more images could not be decoded into tensors; the message names them."""


def _check_size(size: int) -> None:
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"image size must be a positive integer, got {size!r}")


def _check_sha(sha256: str) -> None:
    if not isinstance(sha256, str) or len(sha256) < 3 or not all(c in "0123456789abcdef" for c in sha256):
        raise ValueError(f"sha256 must be a lowercase hex digest, got {sha256!r}")


def _active(policy: NormalizeConfig | None) -> NormalizeConfig | None:
    """The policy when it re-encodes (mode jpeg), else None (plain decoding)."""
    if policy is not None and not isinstance(policy, NormalizeConfig):
        raise TypeError(f"policy must be a NormalizeConfig (preprocess.normalize) or None, got {type(policy).__name__}")
    return policy if policy is not None and policy.mode != "none" else None


def cache_folder_name(size: int, policy: NormalizeConfig | None = None) -> str:
    """'s<size>-<code>' without normalisation, 's<size>-<policy_key>-<code>' with it; <code> names the decoding code."""
    _check_size(size)
    active = _active(policy)
    kind = f"s{size}" if active is None else f"s{size}-{policy_key(active)}"
    return f"{kind}-{producer_code(*TENSOR_PRODUCERS)}"


def tensor_folder(workspace: Workspace, size: int, policy: NormalizeConfig | None = None) -> Path:
    """The tensors of one size and policy made by the current decoding code: cache/tensors/<cache_folder_name>."""
    return workspace.cache / "tensors" / cache_folder_name(size, policy)


def tensor_path(workspace: Workspace, sha256: str, size: int, policy: NormalizeConfig | None = None) -> Path:
    """Cache location of one image's tensor: cache/tensors/<cache_folder_name>/<sha[:2]>/<sha>.npy."""
    return _in_folder(tensor_folder(workspace, size, policy), sha256)


def _in_folder(folder: Path, sha256: str) -> Path:
    """One image's tensor in a tensor folder (loops take the folder once: its name costs a few stat calls)."""
    _check_sha(sha256)
    return folder / sha256[:2] / f"{sha256}.npy"


def _resize_crop(image: Image.Image, size: int) -> Image.Image:
    """Shorter side to size (bilinear, antialiased), then a centred size x size crop."""
    width, height = image.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


def _rng_for(path: Path | BinaryIO, sha256: str | None) -> np.random.Generator:
    """Per-image generator for a random normalisation quality: from the sha (stored files are named <sha>.<ext>)."""
    if sha256 is None and not isinstance(path, str | os.PathLike):
        raise ValueError("decoding an open file with a normalisation policy needs its sha256")
    return image_rng(sha256 or Path(path).stem)


def decode_image(
    path: Path | BinaryIO, size: int, policy: NormalizeConfig | None = None, sha256: str | None = None
) -> np.ndarray:
    """Decode an image file (a path or an open binary file) into a uint8 RGB array (3, size, size): EXIF-oriented,
    resized, centre-cropped.

    With a jpeg normalisation policy the full image is re-encoded (normalize_image) before the resize and crop;
    a random quality is drawn from the image's sha256 (default: the file name's stem; required for an open file).
    """
    _check_size(size)
    active = _active(policy)
    with Image.open(path) as image:
        if image.format == "JPEG" and active is None:
            image.draft("RGB", (size, size))  # DCT scaling: decode at >= size, much faster for large photos
        image.load()
        if active is None:
            rgb = to_rgb(ImageOps.exif_transpose(image))
        else:
            rgb = normalize_image(image, active, _rng_for(path, sha256))
    array = np.asarray(_resize_crop(rgb, size), dtype=np.uint8)
    return np.ascontiguousarray(array.transpose(2, 0, 1))


TENSOR_PRODUCERS = (decode_image,)  # what makes a cached tensor: its digest names the tensor folder


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


_Job = tuple[str, str, int, NormalizeConfig | None, str]  # source, target, size, policy, sha256


def _cache_one(job: _Job) -> str:
    """Decode source into target (a pool job); return "" on success or an error text."""
    source, target, size, policy, sha256 = job
    try:
        _write_array(Path(target), decode_image(Path(source), size, policy, sha256))
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


def _run_jobs(jobs: list[_Job], workers: int | None) -> list[str]:
    """Run decode jobs in-process or in a spawn process pool; return one error text per job ("" = ok)."""
    n_workers = workers if workers is not None else (os.cpu_count() or 1)
    if n_workers < 1:
        raise ValueError(f"workers must be >= 1, got {n_workers}")
    if n_workers == 1 or len(jobs) < POOL_THRESHOLD:
        return [_cache_one(job) for job in progress(jobs, len(jobs), "preprocessing")]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(n_workers, len(jobs)), mp_context=context) as pool:
        return list(pool.map(_cache_one, jobs, chunksize=_CHUNK))


def preprocess_images(
    workspace: Workspace,
    catalog: pd.DataFrame,
    size: int,
    workers: int | None = None,
    policy: NormalizeConfig | None = None,
) -> int:
    """Cache tensors of every ok image with a split (distinct sha); return how many were newly written.

    policy: preprocess.normalize; None or mode 'none' decodes the files as they are.
    """
    _check_size(size)
    active = _active(policy)
    rows = _split_rows(catalog)
    folder = tensor_folder(workspace, size, active)
    jobs: list[_Job] = []
    for sha256, relative in zip(rows["sha256"], rows["path"], strict=True):
        target = _in_folder(folder, str(sha256))
        if target.exists():
            continue
        source = workspace.root / str(relative)
        if not source.is_file():
            raise FileNotFoundError(f"original of {sha256} not found at {source} (the store lost a file)")
        jobs.append((str(source), str(target), size, active, str(sha256)))
    errors = _run_jobs(jobs, workers)
    failed = [f"{Path(job[0]).name}: {error}" for job, error in zip(jobs, errors, strict=True) if error]
    written = len(jobs) - len(failed)
    folder = cache_folder_name(size, active)
    log.info("preprocess %s: %d new tensors, %d cached, %d failed", folder, written, len(rows) - len(jobs), len(failed))
    if failed:
        shown = "; ".join(failed[:5]) + (f" (+{len(failed) - 5} more)" if len(failed) > 5 else "")
        raise PreprocessError(f"{len(failed)} image(s) could not be decoded into tensors: {shown}")
    return written


TensorJobs = list[tuple[str, str]]  # (sha256, path of the original relative to the workspace root)


def missing_tensor_jobs(
    workspace: Workspace, catalog: pd.DataFrame, size: int, policy: NormalizeConfig | None = None
) -> TensorJobs:
    """(sha256, relative path) of each ok image with a split whose tensor is not cached yet (distinct sha)."""
    _check_size(size)
    active = _active(policy)
    rows = _split_rows(catalog)
    folder = tensor_folder(workspace, size, active)
    jobs: TensorJobs = []
    for sha256, relative in zip(rows["sha256"], rows["path"], strict=True):
        if _in_folder(folder, str(sha256)).exists():
            continue
        source = workspace.root / str(relative)
        if not source.is_file():
            raise FileNotFoundError(f"original of {sha256} not found at {source} (the store lost a file)")
        jobs.append((str(sha256), str(relative)))
    return jobs


def write_tensors(
    workspace: Workspace, jobs: Iterable[tuple[str, str]], size: int, policy: NormalizeConfig | None = None
) -> tuple[int, list[str]]:
    """Decode each (sha256, relative path) into its tensor (atomic writes); (how many written, "name: error" list).

    A tensor already cached (e.g. written by another chunk) is left as it is and not counted.
    """
    _check_size(size)
    active = _active(policy)
    folder = tensor_folder(workspace, size, active)
    written, errors = 0, []
    jobs = list(jobs)
    for sha256, relative in progress(jobs, len(jobs), "preprocessing"):
        target = _in_folder(folder, sha256)
        if target.exists():
            continue
        source = workspace.root / relative
        error = _cache_one((str(source), str(target), size, active, sha256))
        if error:
            log.warning("cannot decode %s: %s", source.name, error)
            errors.append(f"{source.name}: {error}")
        else:
            written += 1
    return written, errors


def merge_tensor_results(
    workspace: Workspace,
    catalog: pd.DataFrame,
    size: int,
    policy: NormalizeConfig | None,
    results: Iterable[tuple[int, list[str]]],
) -> int:
    """Total new tensors of the chunks' (written, errors); images still missing are decoded here.

    Raises PreprocessError naming the images that could not be decoded (as preprocess_images does).
    """
    outcomes = list(results)
    written = sum(int(count) for count, _ in outcomes)
    failed = [error for _, errors in outcomes for error in errors]
    failed_names = {error.split(": ", 1)[0] for error in failed}
    late = [
        job for job in missing_tensor_jobs(workspace, catalog, size, policy) if Path(job[1]).name not in failed_names
    ]
    if late:  # e.g. the tensor cache was cleared after the plan was made: never leave a split image undecoded
        log.warning("preprocess: %d images missing from the plan are decoded now", len(late))
        more, errors = write_tensors(workspace, late, size, policy)
        written, failed = written + more, failed + errors
    log.info("preprocess %s: %d new tensors, %d failed", cache_folder_name(size, policy), written, len(failed))
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


def load_tensor(
    workspace: Workspace, sha256: str, size: int, policy: NormalizeConfig | None = None, folder: Path | None = None
) -> np.ndarray:
    """One image's uint8 (3, size, size) array from the cache; decoded (and cached) when missing or damaged.

    folder: tensor_folder(workspace, size, policy) when the caller already has it (one per loop or dataset).
    """
    path = _in_folder(folder or tensor_folder(workspace, size, policy), sha256)
    array = _read_array(path, size)
    if array is None:
        array = decode_image(find_original(workspace, sha256), size, policy, sha256)
        _write_array(path, array)
    return array


def load_tensors(
    workspace: Workspace, shas: Iterable[str], size: int, policy: NormalizeConfig | None = None
) -> torch.Tensor:
    """uint8 tensor [N, 3, size, size] of the images in the given order (what evaluate/report expect)."""
    import torch  # here, not at the top: the decode pool's workers import this module and need no torch

    folder = tensor_folder(workspace, size, policy)
    arrays = [load_tensor(workspace, str(sha), size, policy, folder) for sha in shas]
    if not arrays:
        return torch.empty((0, 3, size, size), dtype=torch.uint8)
    return torch.from_numpy(np.stack(arrays))


def degraded_tensors(
    workspace: Workspace, shas: Iterable[str], size: int, variant: str, policy: NormalizeConfig | None = None
) -> torch.Tensor:
    """uint8 [N, 3, size, size] of the stored originals degraded as files (normalize.degrade_file: re-encoded at a
    JPEG quality, or downscaled), then decoded exactly as training decodes (decode_image with the policy).

    The degraded files exist only in memory; nothing is cached (the robustness pass runs once per evaluation).
    """
    import torch

    _check_size(size)
    arrays = []
    for sha in map(str, shas):
        data = degrade_file(find_original(workspace, sha).read_bytes(), variant)
        arrays.append(decode_image(io.BytesIO(data), size, policy, sha))
    if not arrays:
        return torch.empty((0, 3, size, size), dtype=torch.uint8)
    return torch.from_numpy(np.stack(arrays))


def audit_features(workspace: Workspace, rows: pd.DataFrame, policy: NormalizeConfig | None = None) -> pd.DataFrame:
    """Metadata features (audit.FEATURE_COLUMNS) of usable rows as the model will see them.

    Without a jpeg policy: the stored files (audit.metadata_features). With one: the bytes normalize_image would
    decode (normalized_bytes with the same per-image quality as the tensor cache), so the audit checks what
    normalisation leaves of the shortcut.
    """
    from pipeline_lib.curate import audit

    active = _active(policy)
    if active is None:
        return audit.metadata_features(workspace, rows)
    usable = rows[rows["status"] == STATUS_OK]
    records = []
    for sha256, relative in zip(usable["sha256"], usable["path"], strict=True):
        path = workspace.root / str(relative)
        if not path.is_file():
            raise audit.AuditError(f"stored file of {sha256} is missing: {path}")
        with Image.open(path) as image:
            image.load()
            data = normalized_bytes(image, active, _rng_for(path, str(sha256)))
        records.append(audit.file_metadata(data))
    index = pd.Index(usable["sha256"], name="sha256")
    return pd.DataFrame(records, columns=list(audit.FEATURE_COLUMNS), index=index).astype("float64")
