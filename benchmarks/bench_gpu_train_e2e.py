"""Benchmark: train_model end to end on one CUDA GPU (tensor cache -> augmentation in loader workers -> bf16 step),
against the model step alone on tensors already on the GPU, in the same run.

Says whether the data path keeps the GPU busy: `best_all_layers_fraction_of_step_rate` is the pipeline's train
images/s over what the same model step does on its own. Generates N photo-like JPEGs (512x384) in a temporary
workspace, caches them as uint8 tensors (timed), then trains ResNet50 (weights=none) for 3 epochs per `--workers`
value: head only, then all layers twice (epoch 3 is the warmed-up figure). Prints one JSON object on stdout;
progress goes to stderr. Without CUDA it prints {"skipped": "no CUDA device"} and exits 0.
Usage: .venv/bin/python benchmarks/bench_gpu_train_e2e.py [-n 3072] [--workers 0 4 8] [--batch 128]
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
from bench_gpu_train import VARIANTS, measure
from synthetic import photo_like_image

from pipeline_lib import catalog as cat
from pipeline_lib import preprocess
from pipeline_lib import train as train_lib
from pipeline_lib.config import TrainConfig
from pipeline_lib.workspace import Workspace, put_in_store

log = logging.getLogger("bench_gpu_train_e2e")


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=3072, help="images (default 3072)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 4, 8], help="DataLoader workers to try")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    if not torch.cuda.is_available():
        print(json.dumps({"skipped": "no CUDA device"}))
        return
    torch.backends.cudnn.benchmark = True
    with tempfile.TemporaryDirectory() as tmp:
        workspace = Workspace.create(Path(tmp) / "ws")
        log.info("generating %d JPEGs ...", args.n)
        table = make_catalog(workspace, args.n)
        started = time.perf_counter()
        preprocess.preprocess_images(workspace, table, args.size)
        cache_s = time.perf_counter() - started
        log.info("tensor cache: %.1f s", cache_s)
        runs = {}
        base = dict(model="resnet50", weights="none", image_size=args.size, batch_size=args.batch, device="cuda")
        for workers in args.workers:
            config = TrainConfig(**base, epochs=3, head_only_epochs=1, num_workers=workers, patience=5)
            result = train_lib.train_model(workspace, table, config, Path(tmp) / f"run-w{workers}")
            runs[f"workers_{workers}"] = [
                {
                    "epoch": epoch.epoch,
                    "phase": epoch.phase,
                    "images_per_s": round(epoch.images_per_second, 1),
                    "epoch_s": round(epoch.seconds, 2),
                }
                for epoch in result.history
            ]
            log.info("workers=%d: %s", workers, runs[f"workers_{workers}"])
        step_variant = next(variant for variant in VARIANTS if variant.name == "bf16_channels_last")  # train's step
        model_step = measure(step_variant, "resnet50", args.batch, args.size, warmup=5, steps=20)["images_per_s"]
    best = max(run[-1]["images_per_s"] for run in runs.values())  # epoch 3: all layers, warmed up
    summary = {
        "benchmark": "gpu_train_e2e",
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "n_images": args.n,
        "n_train": int((table["split"] == "train").sum()),
        "batch_size": args.batch,
        "image_size": args.size,
        "tensor_cache_s": round(cache_s, 2),
        "tensor_cache_images_per_s": round(args.n / cache_s, 1),
        "train_model": runs,
        "model_step_only_images_per_s": round(model_step, 1),
        "best_all_layers_fraction_of_step_rate": round(best / model_step, 3),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
