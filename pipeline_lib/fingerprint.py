"""Perceptual fingerprints of ok images, computed once per sha256 and cached in the workspace.

The catalog's `phash` column holds the hash of the *configured* algorithm (phash, dhash, whash or ahash); the
column name is kept for schema stability. The `dhash` column always holds a dhash of the same size, a cheap
second opinion. Pixels are hashed as stored (EXIF orientation is not applied), so a file always hashes the same.

The project's hash of an image (definition version HASH_VERSION) is not `imagehash.<algo>(Image.open(path))` but
a hash of a box-reduced greyscale image, computed in floating point:

1. decode to 8-bit greyscale. JPEGs are decoded straight to their luma (Y) channel, in both modes; other files
   go through `validate.to_rgb` (alpha onto white, 16 bit scaled) and then PIL's "L" conversion;
2. box-reduce by s, the largest of 8, 4, 2, 1 that keeps both sides >= T = DRAFT_FACTOR * hash_size (exactly
   the scale PIL's JPEG draft mode picks for a requested size (T, T)), then box-reduce again by the largest
   integer k that keeps both sides >= T (a 4 MP photo: 2309x1732 -> 289x217 -> 97x73). A box reduce by f is
   the mean of each f x f block of the image edge-replicated to a multiple of f (as a JPEG encoder pads its
   blocks), kept in float32: no rounding to 8 bits after the decode;
3. phash and dhash are computed here in float, exactly as imagehash defines them: phash LANCZOS-resizes (PIL
   mode "F") to 4 * hash_size squared, takes the 2-D DCT-II (unnormalised, as scipy), keeps the low-frequency
   hash_size x hash_size block and compares it with its median; dhash LANCZOS-resizes to (hash_size + 1,
   hash_size) and compares horizontally adjacent pixels. Bits are packed as imagehash.ImageHash packs them.
   ahash and whash (not the default) are imagehash applied to the step-2 image rounded to 8 bits.

With draft=True (the default), step 1 + the first box reduce of a JPEG are done by the decoder itself (DCT
scaling at 1/s: a block's scaled value is the mean of its 8x8, 4x4 or 2x2 samples, i.e. a box average), which
only has to entropy-decode the file. Defining the hash through the box reduce makes the draft and full-decode
hashes agree: the two reduced images differ only by the decoder's rounding of the scaled samples (< 0.5 of a
level), and keeping everything after it in float (version 2 rounded to 8 bits twice more, in the second reduce
and inside imagehash) leaves too little difference to flip a bit (benchmarks/README.md). The price is that the
hash is not bit-identical to imagehash on the raw decoded image (a few of 64 bits differ on most photos). Hashes
from another definition are never mixed: the cache file name carries HASH_VERSION.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import imagehash
import numpy as np
import pandas as pd
import scipy.fft
from PIL import Image

from pipeline_lib.catalog import INVALID_PREFIX, STATUS_OK, conform
from pipeline_lib.progress import progress
from pipeline_lib.validate import to_rgb
from pipeline_lib.workspace import Workspace, atomic_path

log = logging.getLogger(__name__)

ALGORITHMS: tuple[str, ...] = ("phash", "dhash", "whash", "ahash")
CACHE_COLUMNS: tuple[str, ...] = ("sha256", "phash", "dhash")
PARALLEL_MIN_IMAGES = 200  # measured break-even of a 2-worker spawn pool: ~165 images (benchmarks/bench_hashing.py)
# T = DRAFT_FACTOR * hash_size: images are box-reduced to >= T pixels per side before the final LANCZOS resize;
# twice what phash and whash resize to (4 * hash_size), so the LANCZOS resize still does the filtering.
DRAFT_FACTOR = 8
# Version of the hash definition (see the module docstring); part of the cache file name.
HASH_VERSION = 3
UNHASHABLE = "unhashable"
PHASH_FACTOR = 4  # phash's DCT input is (PHASH_FACTOR * hash_size) squared, imagehash's highfreq_factor


def resize_float(luma: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """LANCZOS resize of a float image to size (width, height) in PIL mode "F", as float64."""
    image = Image.fromarray(np.ascontiguousarray(luma, dtype=np.float32))
    return np.asarray(image.resize(size, Image.Resampling.LANCZOS), dtype=np.float64)


def phash_bits(luma: np.ndarray, hash_size: int) -> np.ndarray:
    """imagehash's phash in float: low-frequency DCT-II block of the resized image above its median."""
    side = PHASH_FACTOR * hash_size
    pixels = resize_float(luma, (side, side))
    spectrum = scipy.fft.dct(scipy.fft.dct(pixels, type=2, axis=0), type=2, axis=1)
    low = spectrum[:hash_size, :hash_size]
    return low > np.median(low)


def dhash_bits(luma: np.ndarray, hash_size: int) -> np.ndarray:
    """imagehash's dhash in float: is each pixel of the (hash_size + 1) x hash_size image below its right one."""
    pixels = resize_float(luma, (hash_size + 1, hash_size))
    return pixels[:, 1:] > pixels[:, :-1]


def _as_grey_image(luma: np.ndarray) -> Image.Image:
    """The float image rounded to 8-bit greyscale (for the imagehash-computed algorithms)."""
    return Image.fromarray(np.clip(np.rint(luma), 0, 255).astype(np.uint8))


def _phash(luma: np.ndarray, hash_size: int) -> imagehash.ImageHash:
    return imagehash.ImageHash(phash_bits(luma, hash_size))


def _dhash(luma: np.ndarray, hash_size: int) -> imagehash.ImageHash:
    return imagehash.ImageHash(dhash_bits(luma, hash_size))


def _whash(luma: np.ndarray, hash_size: int) -> imagehash.ImageHash:
    # A fixed image_scale: imagehash's default depends on the decoded size, which draft mode changes.
    return imagehash.whash(_as_grey_image(luma), hash_size=hash_size, image_scale=4 * hash_size)


def _ahash(luma: np.ndarray, hash_size: int) -> imagehash.ImageHash:
    return imagehash.average_hash(_as_grey_image(luma), hash_size=hash_size)


_HASHERS: dict[str, Callable[[np.ndarray, int], imagehash.ImageHash]] = {
    "phash": _phash,
    "dhash": _dhash,
    "whash": _whash,
    "ahash": _ahash,
}


def check_params(algorithm: str, hash_size: int) -> None:
    """Raise ValueError naming the problem if algorithm or hash_size cannot be used."""
    if algorithm not in _HASHERS:
        raise ValueError(f"unknown hash algorithm {algorithm!r}; expected one of {', '.join(ALGORITHMS)}")
    if hash_size < 2:
        raise ValueError(f"hash_size must be >= 2, got {hash_size}")
    if algorithm == "whash" and hash_size & (hash_size - 1):
        raise ValueError(f"whash needs a power-of-two hash_size, got {hash_size}")


def draft_scale(size: tuple[int, int], target: int) -> int:
    """The largest of 8, 4, 2, 1 keeping both sides >= target after dividing (PIL's JPEG draft rule)."""
    whole = min(size[0] // target, size[1] // target)
    return next((scale for scale in (8, 4, 2, 1) if whole >= scale), 1)


def reduced_size(size: tuple[int, int], factor: int) -> tuple[int, int]:
    """Size after a box reduce (or DCT scaling) by factor: partial blocks count, as in PIL and libjpeg."""
    return (-(-size[0] // factor), -(-size[1] // factor))


def box_reduce(pixels: np.ndarray, factor: int) -> np.ndarray:
    """float32 means of factor x factor blocks of a 2-D image edge-replicated to a multiple of factor."""
    if factor <= 1:
        return pixels.astype(np.float32)
    height, width = pixels.shape
    rows, columns = -(-height // factor), -(-width // factor)
    padded = np.pad(pixels, ((0, rows * factor - height), (0, columns * factor - width)), mode="edge")
    sums = padded.reshape(rows, factor, columns * factor).sum(axis=1, dtype=np.float64)  # exact: few 24-bit terms
    sums = sums.reshape(rows, columns, factor).sum(axis=2)
    return (sums / (factor * factor)).astype(np.float32)


def _decode_luma(path: Path, target: int, draft: bool) -> tuple[np.ndarray, tuple[int, int]]:
    """8-bit greyscale pixels of path (JPEG luma, DCT-scaled to the draft scale if draft) and the stored size."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            size = image.size
            if image.format == "JPEG":  # luma straight from the decoder, DCT-scaled by 1/scale in draft mode
                image.draft("L", (target, target) if draft else None)
            image.load()
            grey = image if image.mode == "L" else to_rgb(image).convert("L")
            return np.asarray(grey), size


def reduced_luma(path: Path, hash_size: int = 8, draft: bool = True) -> np.ndarray:
    """The canonical box-reduced float32 greyscale image of path that is hashed (see the module docstring)."""
    target = DRAFT_FACTOR * hash_size
    pixels, size = _decode_luma(Path(path), target, draft)
    scale = draft_scale(size, target)
    first = reduced_size(size, scale)
    shape = (pixels.shape[1], pixels.shape[0])
    if shape == size:
        luma = box_reduce(pixels, scale)
    elif shape == first:  # the decoder's DCT scaling did the first reduce
        luma = pixels.astype(np.float32)
    else:  # a decoder that scaled differently: fall back to a box resize
        image = Image.fromarray(pixels.astype(np.float32)).resize(first, Image.Resampling.BOX)
        luma = np.asarray(image, dtype=np.float32)
    return box_reduce(luma, max(1, min(first[0] // target, first[1] // target)))


def hash_pair(path: Path, algorithm: str = "phash", hash_size: int = 8, draft: bool = True) -> tuple[str, str]:
    """Hex hashes (configured algorithm, dhash) of one image file, decoding it once."""
    check_params(algorithm, hash_size)
    luma = reduced_luma(Path(path), hash_size, draft)
    return str(_HASHERS[algorithm](luma, hash_size)), str(_dhash(luma, hash_size))


def hash_image(path: Path, algorithm: str = "phash", hash_size: int = 8, draft: bool = True) -> str:
    """Hex perceptual hash of one image file (pixels as stored, no EXIF rotation)."""
    return hash_pair(path, algorithm, hash_size, draft)[0]


@dataclass(frozen=True)
class _HashJob:
    """One image to hash (picklable, for the process pool)."""

    sha256: str
    path: str
    algorithm: str
    hash_size: int


@dataclass(frozen=True)
class _HashOutcome:
    """Hashes of one sha256, or the error that prevented them (error is "" on success)."""

    sha256: str
    phash: str
    dhash: str
    error: str
    message: str = ""


def _hash_job(job: _HashJob) -> _HashOutcome:
    """Hash one file; any failure is returned, not raised (runs in a worker process)."""
    try:
        main, second = hash_pair(Path(job.path), job.algorithm, job.hash_size)
    except Exception as error:  # PIL and the hashers raise many types; each becomes a recorded reason
        return _HashOutcome(job.sha256, "", "", type(error).__name__, str(error))
    return _HashOutcome(job.sha256, main, second, "")


def _run_jobs(jobs: list[_HashJob], workers: int | None) -> Iterator[_HashOutcome]:
    """Hash sequentially, or streamed through a spawned process pool when there are many images."""
    n_workers = min(workers or os.cpu_count() or 1, len(jobs))
    if n_workers <= 1 or len(jobs) < PARALLEL_MIN_IMAGES:
        yield from map(_hash_job, jobs)
        return
    chunksize = max(1, min(256, len(jobs) // (4 * n_workers)))
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=n_workers, mp_context=context) as pool:
        yield from pool.map(_hash_job, jobs, chunksize=chunksize)


def cache_path(workspace: Workspace, algorithm: str, hash_size: int) -> Path:
    """Where the sha256 -> hashes table of one (algorithm, hash_size) is kept."""
    return workspace.cache / "hashes" / f"{algorithm}-{hash_size}-v{HASH_VERSION}.parquet"


def _empty_cache() -> pd.DataFrame:
    return pd.DataFrame({name: pd.Series([], dtype="string") for name in CACHE_COLUMNS})


def read_cache(path: Path) -> pd.DataFrame:
    """The cached hashes at path (empty if absent; an unreadable cache is logged and rebuilt)."""
    if not path.is_file():
        return _empty_cache()
    try:
        table = pd.read_parquet(path, engine="pyarrow")
    except (OSError, ValueError) as error:
        log.warning("hash cache %s is unreadable (%s); hashing again", path, error)
        return _empty_cache()
    missing = [name for name in CACHE_COLUMNS if name not in table.columns]
    if missing:
        log.warning("hash cache %s lacks columns %s; hashing again", path, missing)
        return _empty_cache()
    return table[list(CACHE_COLUMNS)].astype("string").drop_duplicates("sha256", keep="last")


def _write_cache(path: Path, table: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        table.sort_values("sha256").reset_index(drop=True).to_parquet(tmp, index=False, engine="pyarrow")


@dataclass(frozen=True)
class FingerprintResult:
    """The hashed catalog and how many images were hashed now, taken from the cache, or found unhashable."""

    catalog: pd.DataFrame
    n_hashed: int
    n_cached: int
    n_unhashable: int


def _jobs_for(
    workspace: Workspace, ok: pd.DataFrame, known: Iterable[str], algorithm: str, hash_size: int
) -> list[_HashJob]:
    """One job per distinct sha256 of ok rows that is not in the cache (its first row's path)."""
    known_set = set(known)
    firsts = ok.drop_duplicates("sha256")
    return [
        _HashJob(sha, str(workspace.root / path), algorithm, hash_size)
        for sha, path in zip(firsts["sha256"], firsts["path"], strict=True)
        if sha not in known_set
    ]


def _collect(outcomes: Iterable[_HashOutcome]) -> tuple[list[_HashOutcome], dict[str, str]]:
    """Split outcomes into successes and sha256 -> error class name."""
    hashed: list[_HashOutcome] = []
    failed: dict[str, str] = {}
    for outcome in outcomes:
        if outcome.error:
            log.warning("cannot hash %s: %s: %s", outcome.sha256[:12], outcome.error, outcome.message)
            failed[outcome.sha256] = outcome.error
        else:
            hashed.append(outcome)
    return hashed, failed


def _fill(catalog: pd.DataFrame, cache: pd.DataFrame, failed: dict[str, str]) -> pd.DataFrame:
    """Put hashes on ok rows and mark rows of unhashable images invalid:unhashable:<Error>."""
    out = catalog.copy()
    ok = out["status"] == STATUS_OK
    by_sha = cache.set_index("sha256")
    known = ok & out["sha256"].isin(by_sha.index)
    out.loc[known, "phash"] = by_sha["phash"].reindex(out.loc[known, "sha256"]).to_numpy()
    out.loc[known, "dhash"] = by_sha["dhash"].reindex(out.loc[known, "sha256"]).to_numpy()
    broken = ok & out["sha256"].isin(list(failed))
    out.loc[broken, "status"] = [f"{INVALID_PREFIX}{UNHASHABLE}:{failed[sha]}" for sha in out.loc[broken, "sha256"]]
    return conform(out)


def fingerprint_catalog_with_stats(
    workspace: Workspace, catalog: pd.DataFrame, algorithm: str, hash_size: int, workers: int | None = None
) -> FingerprintResult:
    """Hash each distinct sha256 of ok rows not hashed before (cached per algorithm and size); fill phash/dhash."""
    check_params(algorithm, hash_size)
    table = conform(catalog)
    path = cache_path(workspace, algorithm, hash_size)
    cache = read_cache(path)
    ok = table[table["status"] == STATUS_OK]
    jobs = _jobs_for(workspace, ok, cache["sha256"], algorithm, hash_size)
    hashed, failed = _collect(_run_jobs(jobs, workers))
    if hashed:
        new = pd.DataFrame([(o.sha256, o.phash, o.dhash) for o in hashed], columns=list(CACHE_COLUMNS))
        cache = pd.concat([cache, new.astype("string")], ignore_index=True)
        _write_cache(path, cache)
    n_cached = ok["sha256"].nunique() - len(jobs)
    log.info(
        "fingerprint %s-%d: %d hashed, %d cached, %d unhashable",
        algorithm,
        hash_size,
        len(hashed),
        n_cached,
        len(failed),
    )
    return FingerprintResult(_fill(table, cache, failed), len(hashed), n_cached, len(failed))


HashJobs = list[tuple[str, str]]  # (sha256, path relative to the workspace root)
HashRow = tuple[str, str, str, str]  # (sha256, hash of the configured algorithm, dhash, error class or "")


def missing_hash_jobs(workspace: Workspace, catalog: pd.DataFrame, algorithm: str, hash_size: int) -> HashJobs:
    """(sha256, relative path) of each distinct ok image whose hashes are not in the cache yet."""
    check_params(algorithm, hash_size)
    table = conform(catalog)
    ok = table[table["status"] == STATUS_OK]
    known = set(read_cache(cache_path(workspace, algorithm, hash_size))["sha256"])
    firsts = ok.drop_duplicates("sha256")
    return [
        (str(sha), str(path)) for sha, path in zip(firsts["sha256"], firsts["path"], strict=True) if sha not in known
    ]


def chunked(jobs: HashJobs, size: int) -> list[tuple[tuple[str, str], ...]]:
    """Jobs cut into tuples of at most size items (the unit of one mapped task)."""
    if size < 1:
        raise ValueError(f"chunk size must be >= 1, got {size}")
    return [tuple(jobs[start : start + size]) for start in range(0, len(jobs), size)]


def hash_jobs(workspace: Workspace, jobs: Iterable[tuple[str, str]], algorithm: str, hash_size: int) -> list[HashRow]:
    """Hash each (sha256, relative path) in turn; a file that cannot be hashed gives a row with its error class."""
    check_params(algorithm, hash_size)
    rows: list[HashRow] = []
    jobs = list(jobs)
    for sha, path in progress(jobs, len(jobs), "hashing"):
        outcome = _hash_job(_HashJob(sha, str(workspace.root / path), algorithm, hash_size))
        if outcome.error:
            log.warning("cannot hash %s: %s: %s", sha[:12], outcome.error, outcome.message)
        rows.append((outcome.sha256, outcome.phash, outcome.dhash, outcome.error))
    return rows


def merge_hash_rows(
    workspace: Workspace, catalog: pd.DataFrame, rows: Iterable[HashRow], algorithm: str, hash_size: int
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Add hashed rows to the cache (atomically) and fill the catalog; images still missing are hashed here.

    Returns the filled catalog and counts {"hashed", "cached", "unhashable"} of distinct ok images.
    """
    check_params(algorithm, hash_size)
    table = conform(catalog)
    outcomes = [_HashOutcome(sha, main, second, error) for sha, main, second, error in rows]
    path = cache_path(workspace, algorithm, hash_size)
    cache = read_cache(path)
    given = {outcome.sha256 for outcome in outcomes}
    late = [job for job in missing_hash_jobs(workspace, table, algorithm, hash_size) if job[0] not in given]
    if late:  # e.g. the hash cache was removed after the plan was made: never leave an ok image unhashed
        log.warning("fingerprint: %d images missing from the plan are hashed now", len(late))
        outcomes += [_HashOutcome(*row) for row in hash_jobs(workspace, late, algorithm, hash_size)]
    hashed, failed = _collect_quiet(outcomes)
    known = set(cache["sha256"])
    fresh = [o for o in hashed if o.sha256 not in known]
    if fresh:
        new = pd.DataFrame([(o.sha256, o.phash, o.dhash) for o in fresh], columns=list(CACHE_COLUMNS))
        cache = pd.concat([cache, new.astype("string")], ignore_index=True)
        _write_cache(path, cache)
    n_ok = int(table.loc[table["status"] == STATUS_OK, "sha256"].nunique())
    stats = {"hashed": len(fresh), "cached": n_ok - len(fresh) - len(failed), "unhashable": len(failed)}
    log.info("fingerprint %s-%d: %s", algorithm, hash_size, stats)
    return _fill(table, cache, failed), stats


def _collect_quiet(outcomes: Iterable[_HashOutcome]) -> tuple[list[_HashOutcome], dict[str, str]]:
    """Like _collect, without logging again (hash_jobs logged each failure where it happened)."""
    hashed = [o for o in outcomes if not o.error]
    failed = {o.sha256: o.error for o in outcomes if o.error}
    return hashed, failed


def fingerprint_catalog(
    workspace: Workspace, catalog: pd.DataFrame, algorithm: str, hash_size: int, workers: int | None = None
) -> pd.DataFrame:
    """The catalog with phash (configured algorithm) and dhash filled for ok rows (see ..._with_stats)."""
    return fingerprint_catalog_with_stats(workspace, catalog, algorithm, hash_size, workers).catalog
