"""Benchmark: perceptual hashing of 4-megapixel JPEGs, naive imagehash loop vs this project's hashing.

Prints one JSON object on stdout; progress goes to stderr.
Usage: .venv/bin/python benchmarks/bench_hashing.py [--quick]
--quick: a tiny run that still takes every path (10 images of 1 MP, one pass, one image per sweep quality).
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from multiprocessing.synchronize import Barrier
from pathlib import Path

import imagehash
import numpy as np
import pandas as pd
import scipy.fftpack
from PIL import Image
from synthetic import photo_like_image

from pipeline_lib.acquire import fingerprint, hashing, jobs
from pipeline_lib.acquire.fingerprint import fingerprint_catalog_with_stats
from pipeline_lib.acquire.hashing import hash_pair
from pipeline_lib.core.catalog import new_rows
from pipeline_lib.core.workspace import Workspace, file_sha256

log = logging.getLogger("bench_hashing")

WIDTH, HEIGHT = 2309, 1732
QUICK_SIZE = (1154, 866)  # a quarter of the pixels: JPEG draft mode still scales by 8 for the 8x8 hash
QUALITY = 90


def structured_image(seed: int, size: tuple[int, int]) -> Image.Image:
    """A photo-like RGB image: upsampled low-frequency colour field, a few shapes, pixel noise."""
    return photo_like_image(seed, *size, max_shape=600 * size[0] // WIDTH)


SWEEP_QUALITIES = (75, 85, 90, 95)


def make_images(folder: Path, n: int, size: tuple[int, int], quality: int = QUALITY) -> list[Path]:
    """n JPEGs of size at quality in folder (the same pictures whatever the quality: seeds 0..n-1)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in range(n):
        path = folder / f"img{seed:04d}.jpg"
        structured_image(seed, size).save(path, "JPEG", quality=quality)
        paths.append(path)
    return paths


def quality_sweep(root: Path, n: int, repeats: int, size: tuple[int, int]) -> list[dict[str, float]]:
    """One-core speedup and decode-only ceiling at each of SWEEP_QUALITIES, on n of the same pictures.

    The draft decode still Huffman-decodes the whole entropy-coded stream, so its cost follows the file size: the
    ratio to the naive loop falls as the quality (bits per pixel) rises.
    """
    rows = []
    for quality in SWEEP_QUALITIES:
        paths = make_images(root / f"q{quality}", n, size, quality)
        naive_s = min(time_naive(paths)[0] for _ in range(repeats))
        seq_s = min(time_sequential(paths)[0] for _ in range(repeats))
        floor_s = min(time_draft_decode_only(paths) for _ in range(repeats))
        mean_bytes = float(np.mean([p.stat().st_size for p in paths]))
        rows.append(
            {
                "jpeg_quality": quality,
                "mean_file_bytes": int(mean_bytes),
                "bits_per_pixel": round(8 * mean_bytes / (size[0] * size[1]), 2),
                "naive_images_per_s": rate(n, naive_s),
                "project_one_core_images_per_s": rate(n, seq_s),
                "project_one_core_speedup": round(naive_s / seq_s, 2),
                "draft_decode_only_speedup_ceiling": round(naive_s / floor_s, 2),
            }
        )
        log.info("quality %d: %s", quality, rows[-1])
    return rows


def rate(n: int, seconds: float) -> float:
    return round(n / seconds, 2)


def time_naive(paths: list[Path]) -> tuple[float, list[str]]:
    """The naive way: imagehash.phash(Image.open(path)) per file."""
    start = time.perf_counter()
    hashes = [str(imagehash.phash(Image.open(path))) for path in paths]
    return time.perf_counter() - start, hashes


def time_sequential(paths: list[Path]) -> tuple[float, list[str]]:
    """This project's hash_pair (draft-mode luma JPEG decode, box reduce, phash + dhash) on one core."""
    start = time.perf_counter()
    hashes = [hash_pair(path, "phash", 8)[0] for path in paths]
    return time.perf_counter() - start, hashes


def time_draft_decode_only(paths: list[Path]) -> float:
    """The floor for any draft-mode hash: open, DCT-downscaled greyscale decode, no hashing."""
    start = time.perf_counter()
    for path in paths:
        with Image.open(path) as image:
            image.draft("L", (64, 64))
            image.load()
    return time.perf_counter() - start


def _warm_worker(barrier: Barrier) -> None:
    """Pool initializer: import all that hashing needs, wait until all workers have."""
    tiny = np.zeros((64, 64), dtype=np.float32)
    hashing.hashes_of_luma(tiny, "phash", 8)
    barrier.wait(timeout=300)


def _noop(value: int) -> int:
    return value


@contextmanager
def started_pool(workers: int) -> Iterator[ProcessPoolExecutor]:
    """A spawn pool like jobs.run_in_pool's whose `workers` processes have all started and imported hashing."""
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(workers + 1)
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_warm_worker, initargs=(barrier,)) as pool:
        futures = [pool.submit(_noop, i) for i in range(workers)]  # each submit starts one more worker
        barrier.wait(timeout=300)
        for future in futures:
            future.result()
        yield pool


# Run with `python -c` (no __main__ file for the workers to re-import): what a pool started by the library costs.
STARTUP_PROBE = f"""
import multiprocessing, sys, time
from concurrent.futures import ProcessPoolExecutor
import {jobs.__name__} as jobs
workers = int(sys.argv[1])
start = time.perf_counter()
context = multiprocessing.get_context("spawn")
with ProcessPoolExecutor(workers, mp_context=context, initializer=jobs.idle_cores) as pool:  # each imports jobs
    for future in [pool.submit(jobs.idle_cores) for _ in range(workers)]:  # each submit starts one more worker
        future.result()
print(time.perf_counter() - start)
"""


def time_pool_startup(workers: int) -> float:
    """Seconds to start `workers` spawned processes that import pipeline_lib.acquire.jobs (what hashing needs), run one
    tiny call each and shut down; the parent is a bare `python -c`, so only the workers' own imports count."""
    command = [sys.executable, "-c", STARTUP_PROBE, str(workers)]
    result = subprocess.run(command, capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1])
    return float(result.stdout.strip().splitlines()[-1])


def time_import(module: str) -> float:
    """Wall seconds of a fresh interpreter that imports module (what a spawned worker pays for it)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True, cwd=Path(__file__).parents[1])
    return time.perf_counter() - start


def catalog_in_workspace(root: Path, paths: list[Path]) -> tuple[Workspace, pd.DataFrame]:
    """A fresh workspace whose store holds the files (hard links) and a catalog of them."""
    workspace = Workspace.create(root)
    rows = []
    for path in paths:
        sha = file_sha256(path)
        target = workspace.store_path(sha, "jpg")
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(path, target)
        rows.append({"sha256": sha, "path": workspace.relative(target), "label": "real", "group": "g", "status": "ok"})
    return workspace, new_rows(rows)


def time_pool(root: Path, paths: list[Path], workers: int) -> dict[str, float]:
    """Hash the files through a pool started for them (start-up included), as jobs.run_in_pool does."""
    work = [jobs.HashJob(path.stem, str(path), "phash", 8) for path in paths]
    start = time.perf_counter()
    outcomes = list(jobs.run_in_pool(jobs.hash_job, work, workers))
    total = time.perf_counter() - start
    return {"total_s": total, "n_hashed": sum(not outcome.error for outcome in outcomes)}


def time_library_default(root: Path, paths: list[Path]) -> dict[str, float]:
    """fingerprint_catalog_with_stats with the default workers: in this process or a pool, as jobs.map_jobs decides;
    the time includes writing the hash cache."""
    workspace, catalog = catalog_in_workspace(root, paths)
    start = time.perf_counter()
    result = fingerprint_catalog_with_stats(workspace, catalog, "phash", 8)
    return {"total_s": time.perf_counter() - start, "n_hashed": result.n_hashed}


def time_warm_pool(paths: list[Path], workers: int) -> float:
    """Seconds to hash the files through an already started pool, mapped as jobs.run_in_pool maps them."""
    work = [jobs.HashJob(path.stem, str(path), "phash", 8) for path in paths]
    chunksize = max(1, min(256, -(-len(work) // (4 * workers))))
    with started_pool(workers) as pool:
        start = time.perf_counter()
        outcomes = list(pool.map(jobs.hash_job, work, chunksize=chunksize))
        seconds = time.perf_counter() - start
    failed = [o for o in outcomes if o.error]
    if failed:
        raise RuntimeError(f"{len(failed)} benchmark images failed to hash, first: {failed[0]}")
    return seconds


def _block_means(pixels: np.ndarray, factor: int) -> np.ndarray:
    """Means of factor x factor blocks of the image edge-replicated to a multiple of factor, in float64."""
    if factor == 1:
        return pixels.astype(np.float64)
    height, width = pixels.shape
    rows, columns = -(-height // factor), -(-width // factor)
    padded = np.pad(pixels.astype(np.float64), ((0, rows * factor - height), (0, columns * factor - width)), "edge")
    return padded.reshape(rows, factor, columns, factor).mean(axis=(1, 3))


def box_reduced_luma_phash(path: Path) -> str:
    """phash-8 of the full-resolution luma box-reduced in float, as the module docstring defines (independent)."""
    target = hashing.DRAFT_FACTOR * 8
    with Image.open(path) as image:
        image.draft("L", None)  # luma at full resolution, no DCT scaling
        image.load()
        grey = np.asarray(image.convert("L"))
    whole = min(grey.shape[1] // target, grey.shape[0] // target)
    reduced = _block_means(grey, next((s for s in (8, 4, 2, 1) if whole >= s), 1))
    reduced = _block_means(reduced, max(1, min(reduced.shape[1] // target, reduced.shape[0] // target)))
    small = Image.fromarray(reduced.astype(np.float32)).resize((32, 32), Image.Resampling.LANCZOS)
    low = scipy.fftpack.dct(scipy.fftpack.dct(np.asarray(small, dtype=np.float64), axis=0), axis=1)[:8, :8]
    return str(imagehash.ImageHash(low > np.median(low)))


def hamming_stats(a: list[str], b: list[str], prefix: str) -> dict[str, float]:
    """Fraction of equal hex hashes, mean and max Hamming distance, keys prefixed."""
    distances = [imagehash.hex_to_hash(x) - imagehash.hex_to_hash(y) for x, y in zip(a, b, strict=True)]
    return {
        f"{prefix}_equal_fraction": round(sum(d == 0 for d in distances) / len(distances), 4),
        f"{prefix}_mean_hamming": round(float(np.mean(distances)), 3),
        f"{prefix}_max_hamming": int(max(distances)),
    }


def agreement(paths: list[Path], draft_hashes: list[str], naive_hashes: list[str]) -> dict[str, object]:
    """Draft vs full decode (phash and the dhash second opinion); the project's hash vs the naive imagehash."""
    draft_pairs = [hash_pair(path, "phash", 8, draft=True) for path in paths]
    full_pairs = [hash_pair(path, "phash", 8, draft=False) for path in paths]
    full = [main for main, _ in full_pairs]
    definition = [box_reduced_luma_phash(path) for path in paths]
    return {
        **hamming_stats(draft_hashes, full, "draft_vs_full_phash"),
        **hamming_stats([d for _, d in draft_pairs], [d for _, d in full_pairs], "draft_vs_full_dhash"),
        "full_decode_equals_float_phash_of_box_reduced_luma": full == definition,
        **hamming_stats(draft_hashes, naive_hashes, "project_vs_naive_imagehash_phash"),
        **hamming_stats(full, naive_hashes, "project_full_decode_vs_naive_imagehash_phash"),
    }


def parse_args() -> argparse.Namespace:
    """The options; --quick fills in the tiny sizes (10 images: more than jobs.SAMPLE_JOBS, so the library's pool
    decision runs too)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny run through every path (seconds): see above")
    parser.add_argument("-n", type=int, default=None, help="number of images (default 128, --quick 10)")
    parser.add_argument("--repeats", type=int, default=None, help="timed passes of each loop, best kept (3; --quick 1)")
    parser.add_argument(
        "--sweep", type=int, default=None, help="images per JPEG quality in the quality sweep (default n/4; 0: skip)"
    )
    args = parser.parse_args()
    args.n = args.n or (jobs.SAMPLE_JOBS + 2 if args.quick else 128)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.sweep = args.sweep if args.sweep is not None else (1 if args.quick else max(4, args.n // 4))
    args.size = QUICK_SIZE if args.quick else (WIDTH, HEIGHT)
    return args


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    n, (width, height) = args.n, args.size
    workers = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "images").mkdir()
        log.info("generating %d %dx%d JPEGs ...", n, width, height)
        paths = make_images(root / "images", n, args.size)
        naive_runs, seq_runs = [], []
        for _ in range(args.repeats):  # interleaved, best of each: less noise from the machine's other load
            naive_s, naive_hashes = time_naive(paths)
            seq_s, draft_hashes = time_sequential(paths)
            naive_runs.append(naive_s)
            seq_runs.append(seq_s)
            log.info("naive: %.2f s, sequential: %.2f s", naive_s, seq_s)
        naive_s, seq_s = min(naive_runs), min(seq_runs)
        floor_s = min(time_draft_decode_only(paths) for _ in range(args.repeats))
        startup_s = min(time_pool_startup(workers) for _ in range(args.repeats))
        import_light = min(time_import(jobs.__name__) for _ in range(args.repeats))
        import_pandas = min(time_import(fingerprint.__name__) for _ in range(args.repeats))
        warm_s = min(time_warm_pool(paths, workers) for _ in range(args.repeats))
        pool = time_pool(root / "ws", paths, workers)
        default = time_library_default(root / "ws-default", paths)
        log.info("pool (%d workers): %.2f s, of which start-up ~%.2f s", workers, pool["total_s"], startup_s)
        agree = agreement(paths, draft_hashes, naive_hashes)
        mean_bytes = int(np.mean([p.stat().st_size for p in paths]))
        sweep = quality_sweep(root / "sweep", args.sweep, args.repeats, args.size) if args.sweep > 0 else []
    naive_rate = n / naive_s
    seconds_saved_per_image = seq_s / n - warm_s / n
    idle = jobs.idle_cores()
    summary = {
        "benchmark": "hashing",
        "n_images": n,
        "quick": args.quick,
        "image_size": [width, height],
        "jpeg_quality": QUALITY,
        "mean_file_bytes": mean_bytes,
        "bits_per_pixel": round(8 * mean_bytes / (width * height), 2),
        "cpu_count": os.cpu_count(),
        "hash_code": fingerprint.hash_code(),
        "single_core_repeats_best_of": args.repeats,
        "naive_imagehash_phash_images_per_s": rate(n, naive_s),
        "project_one_core_images_per_s": rate(n, seq_s),
        "project_one_core_speedup": round((n / seq_s) / naive_rate, 2),
        "target_one_core_speedup": 4.0,
        "draft_decode_only_images_per_s": rate(n, floor_s),
        "draft_decode_only_speedup_ceiling": round((n / floor_s) / naive_rate, 2),
        "project_one_core_fraction_of_ceiling": round(floor_s / seq_s, 3),
        "pool_workers": workers,
        "pool_images_hashed": pool["n_hashed"],
        "pool_total_s": round(pool["total_s"], 3),
        "pool_startup_s": round(startup_s, 3),
        "pool_startup_s_per_worker_cpu": round(startup_s * min(workers, idle) / workers, 3),
        "worker_module_import_s": round(import_light, 3),
        "worker_import_s_if_it_imported_fingerprint_and_pandas": round(import_pandas, 3),
        "library_default_images_per_s": rate(n, default["total_s"]),
        "library_default_pool_workers": jobs.pool_size(n - jobs.SAMPLE_JOBS, seq_s / n, workers, idle, startup_s),
        "worker_startup_s_constant": jobs.WORKER_STARTUP_S,
        "idle_cores_at_end": round(idle, 2),
        "project_pool_images_per_s_incl_startup": rate(n, pool["total_s"]),
        "project_pool_speedup_incl_startup": round((n / pool["total_s"]) / naive_rate, 2),
        "project_pool_images_per_s_excl_startup": rate(n, warm_s),
        "project_pool_speedup_excl_startup": round((n / warm_s) / naive_rate, 2),
        "pool_break_even_images_estimate": (
            int(np.ceil(startup_s / seconds_saved_per_image)) if seconds_saved_per_image > 0 else None
        ),
        **agree,
        "quality_sweep_images_per_quality": args.sweep,
        "quality_sweep": sweep,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
