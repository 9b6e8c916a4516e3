"""Benchmark: near-duplicate detection quality of the default perceptual hash under common edits.

For M distinct generated images and their edited variants (resize 50%, JPEG quality 60, 5% crop, brightness
+10%, small text overlay), reports precision and recall at the default dedup threshold, per-transform recall,
and a threshold sweep. The naive baseline is exact matching (sha256 of the file), whose recall on edits is 0.
Prints one JSON object on stdout; progress goes to stderr.
Usage: .venv/bin/python benchmarks/bench_dedup_quality.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image, ImageDraw, ImageEnhance

from pipeline_lib.acquire.fingerprint import hash_image
from pipeline_lib.core.config import DedupConfig
from pipeline_lib.core.workspace import file_sha256

log = logging.getLogger("bench_dedup_quality")

WIDTH, HEIGHT = 512, 384
SWEEP = range(13)


def original(seed: int) -> Image.Image:
    """A varied structured image: low-frequency colour field of random coarseness, shapes, lines, noise."""
    rng = np.random.default_rng(seed)
    cells = int(rng.integers(2, 9))
    field = rng.integers(0, 256, size=(cells, cells + 1, 3), dtype=np.uint8)
    image = Image.fromarray(field).resize((WIDTH, HEIGHT), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 10))):
        x0, y0 = int(rng.integers(0, WIDTH - 40)), int(rng.integers(0, HEIGHT - 40))
        x1, y1 = x0 + int(rng.integers(20, 250)), y0 + int(rng.integers(20, 200))
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        shape = int(rng.integers(0, 3))
        if shape == 0:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        elif shape == 1:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        else:
            draw.line((x0, y0, x1, y1), fill=colour, width=int(rng.integers(2, 12)))
    pixels = np.asarray(image, dtype=np.int16) + rng.normal(0, 6, size=(HEIGHT, WIDTH, 3)).astype(np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _resize(image: Image.Image) -> Image.Image:
    return image.resize((image.width // 2, image.height // 2), Image.Resampling.LANCZOS)


def _crop(image: Image.Image) -> Image.Image:
    dx, dy = round(image.width * 0.05 / 2), round(image.height * 0.05 / 2)
    return image.crop((dx, dy, image.width - dx, image.height - dy))


def _brightness(image: Image.Image) -> Image.Image:
    return ImageEnhance.Brightness(image).enhance(1.10)


def _text(image: Image.Image) -> Image.Image:
    edited = image.copy()
    ImageDraw.Draw(edited).text((10, image.height - 24), "© example.com 2024", fill=(255, 255, 255))
    return edited


# name -> (edit, JPEG quality of the saved variant); the originals are saved at quality 95.
TRANSFORMS: dict[str, tuple[Callable[[Image.Image], Image.Image], int]] = {
    "resize_50": (_resize, 95),
    "jpeg_q60": (lambda image: image, 60),
    "crop_5pct": (_crop, 95),
    "brightness_plus_10pct": (_brightness, 95),
    "text_overlay": (_text, 95),
}


def build(folder: Path, m: int) -> tuple[list[int], dict[str, list[int]], int]:
    """Write originals and variants; return their int hashes and how many variants equal their original's bytes."""
    originals: list[int] = []
    variants: dict[str, list[int]] = {name: [] for name in TRANSFORMS}
    exact_matches = 0
    for seed in range(m):
        image = original(seed)
        source = folder / f"o{seed:04d}.jpg"
        image.save(source, "JPEG", quality=95)
        originals.append(int(hash_image(source), 16))
        for name, (edit, quality) in TRANSFORMS.items():
            path = folder / f"o{seed:04d}-{name}.jpg"
            edit(image).save(path, "JPEG", quality=quality)
            variants[name].append(int(hash_image(path), 16))
            exact_matches += file_sha256(path) == file_sha256(source)
    return originals, variants, exact_matches


def distances(originals: list[int], variants: dict[str, list[int]]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Hamming distances of positive pairs per transform, and of all negative pairs.

    Negatives: every pair of images (originals or variants) derived from different originals.
    """
    positives = {
        name: np.array([(a ^ b).bit_count() for a, b in zip(originals, values, strict=True)])
        for name, values in variants.items()
    }
    families = [[origin, *(variants[name][k] for name in variants)] for k, origin in enumerate(originals)]
    negatives = [
        (a ^ b).bit_count()
        for i in range(len(families))
        for j in range(i + 1, len(families))
        for a in families[i]
        for b in families[j]
    ]
    return positives, np.array(negatives)


def scores(positives: dict[str, np.ndarray], negatives: np.ndarray, threshold: int) -> dict[str, float]:
    """Precision and recall when pairs within threshold bits are called duplicates."""
    all_positive = np.concatenate(list(positives.values()))
    true_positive = int((all_positive <= threshold).sum())
    false_positive = int((negatives <= threshold).sum())
    called = true_positive + false_positive
    return {
        "threshold": threshold,
        "precision": round(true_positive / called, 4) if called else 1.0,
        "recall": round(true_positive / len(all_positive), 4),
        "true_positives": true_positive,
        "false_positives": false_positive,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="30 originals instead of 100")
    parser.add_argument("-m", type=int, default=None, help="number of originals (default 100, --quick 30)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    m = args.m or (30 if args.quick else 100)
    config = DedupConfig()
    with tempfile.TemporaryDirectory() as tmp:
        log.info("generating %d originals x %d transforms ...", m, len(TRANSFORMS))
        originals, variants, exact_matches = build(Path(tmp), m)
    positives, negatives = distances(originals, variants)
    at_default = scores(positives, negatives, config.threshold)
    summary = {
        "benchmark": "dedup_quality",
        "quick": args.quick,
        "algorithm": config.algorithm,
        "hash_size": config.hash_size,
        "imagehash": imagehash.__version__,
        "n_originals": m,
        "image_size": [WIDTH, HEIGHT],
        "transforms": list(TRANSFORMS),
        "n_positive_pairs": int(sum(len(v) for v in positives.values())),
        "n_negative_pairs": int(len(negatives)),
        "default_threshold": config.threshold,
        "precision_at_default": at_default["precision"],
        "recall_at_default": at_default["recall"],
        "false_positives_at_default": at_default["false_positives"],
        "per_transform_recall_at_default": {
            name: round(float((values <= config.threshold).mean()), 4) for name, values in positives.items()
        },
        "per_transform_mean_distance": {name: round(float(values.mean()), 2) for name, values in positives.items()},
        "per_transform_max_distance": {name: int(values.max()) for name, values in positives.items()},
        "negative_min_distance": int(negatives.min()),
        "negative_distance_percentile_1": float(np.percentile(negatives, 1)),
        "naive_exact_sha256_recall": round(exact_matches / sum(len(v) for v in positives.values()), 4),
        "sweep": [scores(positives, negatives, t) for t in SWEEP],
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
