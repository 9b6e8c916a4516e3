"""Benchmark: does the review queue put planted label errors first, and how long does scoring 2,000 images take?

Generated data (the demo's SYNTHETIC faces, pipeline_lib/ops/demo_faces): approved images of both classes (a small
champion is trained here, on CPU, on part of them; the rest are approved images it never saw), then a crawl of new
people with planted errors put into its folders: images of the other class (AI portraits in the real folder, photos
in the AI folder) and off-topic images drawn here (landscapes, text, noise). The queue (assess.review_queue) is
built with the champion's own predictions, then with the cross-validated fallback (the same model only embeds),
then with no model at all (near-duplicate, face and tiny hints only). For each: the fraction of planted errors in
the first 10% and 20% of the queue, against the same for a random order (seeded, and its expectation), and
precision at 10 and 50. Timing: seconds to score the pending images with the approved ones already embedded (what
a re-crawl costs), the same with nothing cached, and a re-score with everything cached; torch on `--threads` (2)
cores. Prints one JSON object on stdout; progress goes to stderr.
Usage: .venv/bin/python benchmarks/bench_review_queue.py [--quick] [--seed N] [--pending N]
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageDraw, ImageFilter

from pipeline_lib.assess import review_queue
from pipeline_lib.assess.review_scorer import Scorer, classifier_scorer
from pipeline_lib.core.catalog import STATUS_OK, new_rows
from pipeline_lib.core.workspace import Workspace, put_in_store
from pipeline_lib.curate import review
from pipeline_lib.learn import features, models
from pipeline_lib.learn.preprocess import decode_image
from pipeline_lib.ops.demo_faces import class_files

log = logging.getLogger("bench_review_queue")
DEFAULT_SEED = 20270527  # the tests never use it
GOAL_TOP20 = 0.9


@dataclass(frozen=True)
class Sizes:
    approved_persons: int  # per class; about 3 images each
    pending: int  # images in the crawl, planted errors included
    planted_fraction: float
    draw_size: int  # generated images are draw_size x draw_size
    image_size: int  # the champion's input
    epochs: int


FULL = Sizes(approved_persons=100, pending=2000, planted_fraction=0.08, draw_size=64, image_size=48, epochs=4)
QUICK = Sizes(approved_persons=6, pending=40, planted_fraction=0.1, draw_size=32, image_size=32, epochs=1)


# --- off-topic images, drawn here -------------------------------------------------------------------------------


def landscape(rng: np.random.Generator, size: int) -> Image.Image:
    """Sky gradient, a sun, layered hills."""
    top, bottom = rng.integers(60, 256, 3), rng.integers(0, 200, 3)
    ramp = np.linspace(0, 1, size)[:, None, None]
    sky = (top * (1 - ramp) + bottom * ramp).repeat(size, axis=1).astype(np.uint8)
    image = Image.fromarray(sky, "RGB")
    draw = ImageDraw.Draw(image)
    x, y = (int(v) for v in rng.integers(0, size, 2))
    r = int(rng.integers(size // 12, size // 5))
    draw.ellipse((x - r, y - r, x + r, y + r), fill=(255, 230, int(rng.integers(80, 200))))
    for layer in range(int(rng.integers(2, 5))):
        base = size * (0.45 + 0.15 * layer)
        points = [(0, size)] + [(int(px), int(base - rng.uniform(0, size / 4))) for px in np.linspace(0, size, 7)]
        draw.polygon(points + [(size, size)], fill=tuple(int(c) for c in rng.integers(0, 150, 3)))
    return image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0, 1.2))))


def text_image(rng: np.random.Generator, size: int) -> Image.Image:
    """Lines of random letters on a plain background (a screenshot, a meme caption)."""
    paper = tuple(int(c) for c in rng.integers(180, 256, 3))
    ink = tuple(int(c) for c in rng.integers(0, 90, 3))
    image = Image.new("RGB", (size, size), paper)
    draw = ImageDraw.Draw(image)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz     "))
    for line in range(0, size, max(8, size // 8)):
        draw.text((2, line), "".join(rng.choice(letters, 24)), fill=ink)
    return image


def noise_image(rng: np.random.Generator, size: int) -> Image.Image:
    """Coloured noise, smoothed at a random scale."""
    cells = int(rng.integers(2, size // 2))
    field = rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8)
    image = Image.fromarray(field, "RGB").resize((size, size), Image.Resampling.NEAREST)
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, 25, (size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


OFF_TOPIC = {"landscape": landscape, "text": text_image, "noise": noise_image}


def encoded(image: Image.Image, label: str, rng: np.random.Generator) -> bytes:
    """Bytes as the folder's files are: JPEG for the real folder, PNG for the AI folder."""
    buffer = io.BytesIO()
    if label == "real":
        image.save(buffer, "JPEG", quality=int(rng.integers(55, 90)))
    else:
        image.save(buffer, "PNG")
    return buffer.getvalue()


# --- the workspace: approved images, a crawl with planted errors --------------------------------------------------


def _rows(workspace: Workspace, files: dict[str, bytes], label: str, tag: str) -> list[dict[str, object]]:
    """Store files (<group>/<name> -> bytes) and return their catalog rows."""
    rows = []
    for name, data in sorted(files.items()):
        ext = "png" if data[:4] == b"\x89PNG" else "jpg"
        sha, path = put_in_store(workspace, data, ext)
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
        rows.append(
            {
                "sha256": sha,
                "path": workspace.relative(path),
                "label": label,
                "group": f"{tag}{name.split('/')[0]}",
                "status": STATUS_OK,
                "width": width,
                "height": height,
                "source": f"folder:{label}",
                "url": f"file:///{label}/{name}",
            }
        )
    return rows


def approved_data(workspace: Workspace, sizes: Sizes, seed: int) -> pd.DataFrame:
    """Clean images of both classes; decisions approve them all."""
    rows = []
    for label in ("real", "ai"):
        rows += _rows(workspace, class_files(seed, sizes.approved_persons, sizes.draw_size, label), label, "old-")
    table = pd.DataFrame(rows)
    review.append_decisions(workspace, [review.Decision(sha, "approve", "", "bench") for sha in table["sha256"]])
    return table


def crawl_with_planted_errors(workspace: Workspace, sizes: Sizes, seed: int) -> tuple[pd.DataFrame, dict[str, str]]:
    """New people's images (pending) with planted errors put into their folders; (rows, planted sha256 -> kind)."""
    rng = np.random.default_rng([seed, 99])
    planted_n = max(3, round(sizes.pending * sizes.planted_fraction))
    wrong_class, off_topic = planted_n * 5 // 8, planted_n - planted_n * 5 // 8
    persons = max(2, round((sizes.pending - planted_n) / 2 / 3))  # about 3 images per person
    clean = {label: class_files(seed + 1, persons, sizes.draw_size, label) for label in ("real", "ai")}
    swapped = {label: class_files(seed + 2, persons, sizes.draw_size, label) for label in ("real", "ai")}
    rows, planted = [], {}
    for label in ("real", "ai"):
        rows += _rows(workspace, clean[label], label, "new-")
    for i in range(wrong_class):  # alternate: an AI portrait in the real folder, a photo in the AI folder
        label, other = ("real", "ai") if i % 2 == 0 else ("ai", "real")
        name = sorted(swapped[other])[i // 2 % len(swapped[other])]
        group = sorted(clean[label])[int(rng.integers(len(clean[label])))].split("/")[0]
        found = _rows(workspace, {f"{group}/planted-{i}": swapped[other][name]}, label, "new-")
        rows += found
        planted |= {str(row["sha256"]): f"{other} image in the {label} folder" for row in found}
    kinds = list(OFF_TOPIC)
    for i in range(off_topic):
        label = ("real", "ai")[i % 2]
        image = OFF_TOPIC[kinds[i % len(kinds)]](rng, sizes.draw_size)
        group = sorted(clean[label])[int(rng.integers(len(clean[label])))].split("/")[0]
        found = _rows(workspace, {f"{group}/offtopic-{i}": encoded(image, label, rng)}, label, "new-")
        rows += found
        planted |= {str(row["sha256"]): f"{kinds[i % len(kinds)]} in the {label} folder" for row in found}
    table = pd.DataFrame(rows).drop_duplicates("sha256")
    return table, {sha: kind for sha, kind in planted.items() if sha in set(table["sha256"])}


# --- a small champion, trained here on CPU -----------------------------------------------------------------------


def train_champion(workspace: Workspace, rows: pd.DataFrame, sizes: Sizes, seed: int) -> models.Classifier:
    """A resnet18 (random init) trained on rows for sizes.epochs epochs with horizontal flips; eval mode."""
    torch.manual_seed(seed)
    model = models.Classifier("resnet18")
    images = torch.from_numpy(np.stack([decode_image(workspace.root / p, sizes.image_size) for p in rows["path"]]))
    labels = torch.tensor([0 if label == "real" else 1 for label in rows["label"]])
    optimiser = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(sizes.epochs):
        order = torch.randperm(len(images), generator=generator)
        total = 0.0
        for start in range(0, len(order), 32):
            batch = order[start : start + 32]
            x = images[batch].float() / 255.0
            x = torch.where(torch.rand(len(batch), 1, 1, 1, generator=generator) < 0.5, x.flip(3), x)
            loss = torch.nn.functional.cross_entropy(model(x), labels[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * len(batch)
        log.info("champion epoch %d: loss %.4f", epoch + 1, total / len(images))
    return model.eval()


# --- figures ----------------------------------------------------------------------------------------------------


def ranking_figures(order: list[str], planted: Mapping[str, str]) -> dict[str, float]:
    """Fraction of planted errors in the first 10% / 20% of order, and precision at 10 / 50."""
    n = len(order)
    hits = np.array([sha in planted for sha in order])
    figures = {
        f"found_in_top{p}pct": float(hits[: max(1, round(n * p / 100))].sum() / max(1, len(planted))) for p in (10, 20)
    }
    figures |= {f"precision_at_{k}": float(hits[:k].mean()) for k in (10, 50) if k <= n}
    return figures


def queue_figures(
    workspace: Workspace,
    catalog: pd.DataFrame,
    scorer: Scorer | None,
    planted: Mapping[str, str],
    settings: review_queue.QueueSettings,
) -> tuple[dict[str, object], float]:
    """The ranking figures of one queue and the seconds it took."""
    started = time.perf_counter()
    queue = review_queue.build_queue(workspace, catalog, review.read_decisions(workspace), scorer, settings)
    seconds = time.perf_counter() - started
    figures: dict[str, object] = ranking_figures(list(queue.rows["sha256"]), planted)
    figures |= {"sources": list(queue.sources), "features_computed": queue.computed, "features_reused": queue.reused}
    top = queue.rows.head(5)
    figures["top5"] = [f"{s:.2f} {w}" for s, w in zip(top["suspicion"], top["why"], strict=True)]
    cut = max(1, round(len(queue.rows) * 0.2))
    missed = queue.rows.iloc[cut:]
    missed = missed[missed["sha256"].isin(list(planted))]
    figures["missed_in_top20pct"] = [
        f"{planted[row.sha256]}: rank {index + 1}, suspicion {row.suspicion:.2f} ({'; '.join(row.reasons)})"
        for index, row in zip(missed.index, missed.itertuples(), strict=True)
    ]
    return figures, seconds


def run(sizes: Sizes, seed: int, threads: int) -> dict[str, object]:
    """Generate, train, score; the figures."""
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as folder:
        workspace = Workspace.create(Path(folder) / "ws")
        started = time.perf_counter()
        approved = approved_data(workspace, sizes, seed)
        pending, planted = crawl_with_planted_errors(workspace, sizes, seed)
        catalog = new_rows([*approved.to_dict("records"), *pending.to_dict("records")])
        log.info(
            "data: %d approved, %d pending (%d planted) in %.1f s",
            len(approved),
            len(pending),
            len(planted),
            time.perf_counter() - started,
        )
        groups = sorted(set(approved["group"]))
        trained_groups = set(np.random.default_rng(seed).permutation(groups)[: round(len(groups) * 0.7)])
        train_rows = approved[approved["group"].isin(trained_groups)]
        started = time.perf_counter()
        model = train_champion(workspace, train_rows, sizes, seed)
        train_s = time.perf_counter() - started
        champion = classifier_scorer("bench/1", model, sizes.image_size, trained_on=frozenset(train_rows["sha256"]))
        fallback = classifier_scorer("checkpoint/bench", model, sizes.image_size, own_predictions=False)
        settings = review_queue.QueueSettings(tiny_side=16)
        cold, cold_s = queue_figures(workspace, catalog, champion, planted, settings)  # nothing cached yet
        for key in list(workspace.cache.glob("features/*")):  # forget the pending images' features only
            for sha in pending["sha256"]:
                features.feature_path(workspace, key.name, sha).unlink(missing_ok=True)
        recrawl, recrawl_s = queue_figures(workspace, catalog, champion, planted, settings)
        warm, warm_s = queue_figures(workspace, catalog, champion, planted, settings)
        cv, cv_s = queue_figures(workspace, catalog, fallback, planted, settings)
        hints, hints_s = queue_figures(workspace, catalog, None, planted, settings)
    shuffled = list(np.random.default_rng(seed + 7).permutation(list(pending["sha256"])))
    per_2000 = 2000 / len(pending)
    return {
        "seed": seed,
        "threads": threads,
        "cpu_count": os.cpu_count(),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "approved_images": len(approved),
        "champion_trained_on": len(train_rows),
        "pending_images": len(pending),
        "planted_errors": len(planted),
        "image_size": sizes.image_size,
        "train_seconds": round(train_s, 1),
        "champion": recrawl,
        "cross_validated_fallback": cv,
        "hints_only": hints,
        "random_order": ranking_figures(shuffled, planted) | {"expected_top10pct": 0.1, "expected_top20pct": 0.2},
        "goal_top20pct": GOAL_TOP20,
        "goal_met": bool(recrawl["found_in_top20pct"] >= GOAL_TOP20),
        "seconds": {
            "score_pending_approved_cached": round(recrawl_s, 2),
            "score_all_uncached": round(cold_s, 2),
            "rescore_all_cached": round(warm_s, 2),
            "cross_validated_fallback_cached": round(cv_s, 2),
            "hints_only": round(hints_s, 2),
        },
        "seconds_per_2000_pending": round(recrawl_s * per_2000, 1),
        "cold_first_queue": {k: cold[k] for k in ("found_in_top10pct", "found_in_top20pct")},
        "warm_queue_same_order": warm["found_in_top20pct"] == recrawl["found_in_top20pct"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes for CI (a few seconds)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="data and training seed")
    parser.add_argument("--pending", type=int, default=None, help="images in the crawl (default 2000; quick 60)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the 2 CPU cores of the goal)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    sizes = QUICK if args.quick else FULL
    if args.pending:
        sizes = Sizes(**{**sizes.__dict__, "pending": args.pending})
    summary = {"benchmark": "review_queue", "quick": args.quick} | run(sizes, args.seed, args.threads)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
