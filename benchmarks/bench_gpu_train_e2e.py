"""Benchmark: train_model end to end on one CUDA GPU (tensor cache -> loader workers -> augmentation -> model step),
against the model step alone on tensors already on the GPU, in the same run.

Says whether the data path keeps the GPU busy. For each `--workers` value it trains twice: augmenting on the GPU
(`train.augment_on: device`, the CUDA default: the workers only read the cache and draw parameters) and the naive
way, augmenting in the CPU loader workers (`augment_on: loader`). Generates N photo-like JPEGs (512x384) in a
temporary workspace, caches them as uint8 tensors (timed), then trains ResNet50 (weights=none) for 3 epochs per run:
head only, then all layers twice (epoch 3 is the warmed-up figure). The model step alone is bench_gpu_train's step
at the precision train picks on this GPU. Prints one JSON object on stdout with `end_to_end_images_per_s`,
`model_step_images_per_s` and their `ratio` (target: >= 0.9 with at most 8 workers); progress goes to stderr.
Without CUDA it prints {"skipped": "no CUDA device"} and exits 0; --quick (or --smoke) runs the same code with tiny
sizes on the CPU, with or without CUDA (checks that the script works, measures nothing useful).
Usage: .venv/bin/python benchmarks/bench_gpu_train_e2e.py [-n 3072] [--workers 4 8] [--batch 128] [--quick]
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
from pathlib import Path

import pandas as pd
import torch
from bench_gpu_train import measure, train_variant
from synthetic import photo_like_image

from pipeline_lib.core import catalog as cat
from pipeline_lib.core import devices
from pipeline_lib.core.config import TrainConfig
from pipeline_lib.core.workspace import Workspace, put_in_store
from pipeline_lib.learn import preprocess
from pipeline_lib.learn.train import train_model

log = logging.getLogger("bench_gpu_train_e2e")
AUGMENT_ON = ("device", "loader")  # the project's CUDA default first, then the naive way


def make_catalog(workspace: Workspace, n: int) -> pd.DataFrame:
    """n JPEGs in the store: 80% train, 20% val, half of each 'ai'; 16 images per group."""
    records = []
    for index in range(n):
        buffer = io.BytesIO()
        photo_like_image(index, 512, 384, max_shape=150).save(buffer, "JPEG", quality=90)
        sha, path = put_in_store(workspace, buffer.getvalue(), "jpg")
        label = "ai" if index % 2 else "real"
        split = "val" if index % 5 == 0 else "train"
        records.append(
            {
                "sha256": sha,
                "path": workspace.relative(path),
                "label": label,
                "group": f"{label}-{index // 32}",
                "status": "ok",
                "split": split,
            }
        )
    return cat.new_rows(records)


def train_run(workspace: Workspace, table: pd.DataFrame, config: TrainConfig, out_dir: Path) -> list[dict[str, float]]:
    """train_model once; each epoch's phase, train images/s and seconds."""
    result = train_model(workspace, table, config, out_dir)
    return [
        {
            "epoch": epoch.epoch,
            "phase": epoch.phase,
            "images_per_s": round(epoch.images_per_second, 1),
            "epoch_s": round(epoch.seconds, 2),
        }
        for epoch in result.history
    ]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=3072, help="images (default 3072)")
    parser.add_argument("--workers", type=int, nargs="+", default=[4, 8], help="DataLoader workers to try")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--model", default="resnet50", choices=["resnet50", "resnet18"])
    parser.add_argument(
        "--quick", "--smoke", dest="quick", action="store_true", help="tiny sizes on the CPU: checks the script"
    )
    args = parser.parse_args()
    if args.quick:
        args.n, args.workers, args.batch, args.size, args.model = 20, [0], 4, 32, "resnet18"
    return args


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    if not args.quick and not torch.cuda.is_available():
        print(json.dumps({"skipped": "no CUDA device"}))
        return
    device = "cpu" if args.quick else "cuda"
    precision = devices.resolve_precision("auto", device)
    torch.backends.cudnn.benchmark = True
    with tempfile.TemporaryDirectory() as tmp:
        workspace = Workspace.create(Path(tmp) / "ws")
        log.info("generating %d JPEGs ...", args.n)
        table = make_catalog(workspace, args.n)
        started = time.perf_counter()
        preprocess.preprocess_images(workspace, table, args.size)
        cache_s = time.perf_counter() - started
        log.info("tensor cache: %.1f s", cache_s)
        runs: dict[str, dict[str, list[dict[str, float]]]] = {mode: {} for mode in AUGMENT_ON}
        base = {"model": args.model, "weights": "none", "image_size": args.size, "batch_size": args.batch}
        n_epochs = 2 if args.quick else 3  # head only, then all layers (--quick: once; else twice, the last warmed up)
        for workers in args.workers:
            for mode in AUGMENT_ON:
                config = TrainConfig(
                    **base, device=device, epochs=n_epochs, head_only_epochs=1, num_workers=workers, augment_on=mode
                )
                epochs = train_run(workspace, table, config, Path(tmp) / f"run-{mode}-w{workers}")
                runs[mode][f"workers_{workers}"] = epochs
                log.info("augment_on=%s workers=%d: %s", mode, workers, epochs)
        warmup, steps = (1, 2) if args.quick else (5, 20)
        step = measure(train_variant(precision), args.model, args.batch, args.size, warmup, steps, device)
    model_step = step["images_per_s"]
    best = {mode: max(run[-1]["images_per_s"] for run in runs[mode].values()) for mode in AUGMENT_ON}  # epoch 3
    summary = {
        "benchmark": "gpu_train_e2e",
        "quick": args.quick,
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "precision": precision,
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "model": args.model,
        "n_images": args.n,
        "n_train": int((table["split"] == "train").sum()),
        "batch_size": args.batch,
        "image_size": args.size,
        "tensor_cache_s": round(cache_s, 2),
        "tensor_cache_images_per_s": round(args.n / cache_s, 1),
        "train_model": runs,
        "end_to_end_images_per_s": best["device"],
        "model_step_images_per_s": round(model_step, 1),
        "ratio": round(best["device"] / model_step, 3),
        "naive_loader_augmentation_images_per_s": best["loader"],
        "naive_ratio": round(best["loader"] / model_step, 3),
        "speedup_vs_naive": round(best["device"] / best["loader"], 2),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
