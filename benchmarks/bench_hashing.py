"""Benchmark: perceptual hashing of 4-megapixel JPEGs, naive imagehash loop vs this project's hashing.

Prints one JSON object on stdout; progress goes to stderr.
Usage: .venv/bin/python benchmarks/bench_hashing.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image, ImageDraw

from pipeline_lib import fingerprint
from pipeline_lib.catalog import new_rows
from pipeline_lib.fingerprint import fingerprint_catalog_with_stats, hash_image, hash_pair
from pipeline_lib.workspace import Workspace, file_sha256

log = logging.getLogger("bench_hashing")

WIDTH, HEIGHT = 2309, 1732
QUALITY = 90


def structured_image(seed: int) -> Image.Image:
    """A photo-like RGB image: upsampled low-frequency colour field, a few shapes, pixel noise."""
    rng = np.random.default_rng(seed)
    field = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    image = Image.fromarray(field).resize((WIDTH, HEIGHT), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(8):
        x0, y0 = int(rng.integers(0, WIDTH - 200)), int(rng.integers(0, HEIGHT - 200))
        x1, y1 = x0 + int(rng.integers(50, 600)), y0 + int(rng.integers(50, 600))
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    pixels = np.asarray(image, dtype=np.int16) + rng.normal(0, 8, size=(HEIGHT, WIDTH, 3)).astype(np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def make_images(folder: Path, n: int) -> list[Path]:
    """n JPEGs (quality QUALITY) in folder/store layout-free paths."""
    paths = []
    for seed in range(n):
        path = folder / f"img{seed:04d}.jpg"
        structured_image(seed).save(path, "JPEG", quality=QUALITY)
        paths.append(path)
    return paths


def rate(n: int, seconds: float) -> float:
    return round(n / seconds, 2)


def time_naive(paths: list[Path]) -> tuple[float, list[str]]:
    """The naive way: imagehash.phash(Image.open(path)) per file."""
    start = time.perf_counter()
    hashes = [str(imagehash.phash(Image.open(path))) for path in paths]
    return time.perf_counter() - start, hashes


def time_sequential(paths: list[Path]) -> tuple[float, list[str]]:
    """This project's hash_pair (draft-mode JPEG decode, phash + dhash) on one core."""
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


def time_pool(root: Path, paths: list[Path], workers: int) -> tuple[float, int]:
    """fingerprint_catalog_with_stats over a catalog of the files in a fresh workspace (process pool)."""
    workspace = Workspace.create(root / "ws")
    rows = []
    for path in paths:
        sha = file_sha256(path)
        target = workspace.store_path(sha, "jpg")
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(path, target)
        rows.append({"sha256": sha, "path": workspace.relative(target), "label": "real", "group": "g", "status": "ok"})
    catalog = new_rows(rows)
    default_minimum = fingerprint.PARALLEL_MIN_IMAGES
    fingerprint.PARALLEL_MIN_IMAGES = 1  # the pool is what is measured, even for fewer images than the default
    try:
        start = time.perf_counter()
        result = fingerprint_catalog_with_stats(workspace, catalog, "phash", 8, workers=workers)
        return time.perf_counter() - start, result.n_hashed
    finally:
        fingerprint.PARALLEL_MIN_IMAGES = default_minimum


def agreement(paths: list[Path], draft_hashes: list[str], naive_hashes: list[str]) -> dict[str, object]:
    """How often the draft hash equals the full-decode hash, and the mean Hamming difference."""
    full = [hash_image(path, "phash", 8, draft=False) for path in paths]
    distances = [imagehash.hex_to_hash(a) - imagehash.hex_to_hash(b) for a, b in zip(draft_hashes, full, strict=True)]
    full_equals_naive_decoded = all(
        f == str(imagehash.phash(Image.open(path).convert("L"))) for f, path in zip(full, paths, strict=True)
    )
    return {
        "draft_equals_full_fraction": sum(d == 0 for d in distances) / len(distances),
        "mean_hamming_draft_vs_full": round(float(np.mean(distances)), 3),
        "max_hamming_draft_vs_full": int(max(distances)),
        "full_decode_equals_imagehash_phash": full_equals_naive_decoded,
        "full_decode_equals_naive_loop": full == naive_hashes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8 images instead of 40")
    parser.add_argument("-n", type=int, default=None, help="number of images (default 40, --quick 8)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes of the single-core loops (best kept)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    n = args.n or (8 if args.quick else 40)
    workers = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "images").mkdir()
        log.info("generating %d %dx%d JPEGs ...", n, WIDTH, HEIGHT)
        paths = make_images(root / "images", n)
        naive_runs, seq_runs = [], []
        for _ in range(args.repeats):  # interleaved, best of each: less noise from the machine's other load
            naive_s, naive_hashes = time_naive(paths)
            seq_s, draft_hashes = time_sequential(paths)
            naive_runs.append(naive_s)
            seq_runs.append(seq_s)
            log.info("naive: %.2f s, sequential: %.2f s", naive_s, seq_s)
        naive_s, seq_s = min(naive_runs), min(seq_runs)
        floor_s = min(time_draft_decode_only(paths) for _ in range(args.repeats))
        pool_s, n_hashed = time_pool(root, paths, workers)
        log.info("pool (%d workers): %.2f s", workers, pool_s)
        agree = agreement(paths, draft_hashes, naive_hashes)
        mean_bytes = int(np.mean([p.stat().st_size for p in paths]))
    naive_rate = n / naive_s
    summary = {
        "benchmark": "hashing",
        "n_images": n,
        "image_size": [WIDTH, HEIGHT],
        "jpeg_quality": QUALITY,
        "mean_file_bytes": mean_bytes,
        "cpu_count": os.cpu_count(),
        "single_core_repeats_best_of": args.repeats,
        "naive_imagehash_phash_images_per_s": rate(n, naive_s),
        "project_one_core_images_per_s": rate(n, seq_s),
        "project_one_core_speedup": round((n / seq_s) / naive_rate, 2),
        "target_one_core_speedup": 4.0,
        "draft_decode_only_images_per_s": rate(n, floor_s),
        "draft_decode_only_speedup_ceiling": round((n / floor_s) / naive_rate, 2),
        "pool_workers": workers,
        "pool_images_hashed": n_hashed,
        "pool_forced_below_parallel_min_images": n < fingerprint.PARALLEL_MIN_IMAGES,
        "project_pool_images_per_s": rate(n, pool_s),
        "project_pool_speedup": round((n / pool_s) / naive_rate, 2),
        "project_pool_s_includes_cache_write_and_pool_start": True,
        **agree,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
