"""Benchmark: the training data path, naive PIL decode per sample vs this project's tensor cache; training steps.

Prints one JSON object on stdout; progress goes to stderr.
Usage: .venv/bin/python benchmarks/bench_data_path.py [--quick] [-n N] [--workers 0 2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from synthetic import photo_like_image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from pipeline_lib.core import devices
from pipeline_lib.core.catalog import new_rows
from pipeline_lib.core.config import LABELS, AugmentConfig, TrainConfig
from pipeline_lib.core.workspace import Workspace, put_in_store
from pipeline_lib.learn import preprocess
from pipeline_lib.learn.augment import build_augmentation
from pipeline_lib.learn.datasets import CachedImages, make_loader
from pipeline_lib.learn.models import build_model

log = logging.getLogger("bench_data_path")

WIDTH, HEIGHT = 1600, 1200
QUALITY = 90
SIZE = 224
BATCH = 16


def photo_like(seed: int) -> bytes:
    """JPEG bytes of a photo-like image: upsampled colour field, a few shapes, pixel noise."""
    buffer = io.BytesIO()
    photo_like_image(seed, WIDTH, HEIGHT, max_shape=500).save(buffer, "JPEG", quality=QUALITY)
    return buffer.getvalue()


def make_workspace(root: Path, n: int) -> tuple[Workspace, pd.DataFrame]:
    """A Workspace with n stored JPEGs and a catalog of them (status ok, split train, labels alternating)."""
    workspace = Workspace.create(root)
    records = []
    for seed in range(n):
        sha, path = put_in_store(workspace, photo_like(seed), "jpg")
        label = LABELS[seed % 2]
        records.append(
            {
                "sha256": sha,
                "path": workspace.relative(path),
                "label": label,
                "group": f"{label}-{seed % 4}",
                "status": "ok",
                "split": "train",
            }
        )
    return workspace, new_rows(records)


class NaiveImages(Dataset):
    """What a plain torchvision ImageFolder pipeline does: PIL open + RGB, Resize, CenterCrop, ToTensor per sample."""

    def __init__(self, paths: list[Path], labels: list[int]) -> None:
        self.paths = paths
        self.labels = labels
        self.transform = transforms.Compose(
            [transforms.Resize(SIZE), transforms.CenterCrop(SIZE), transforms.ToTensor()]
        )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.paths[index]) as image:
            rgb = image.convert("RGB")
        return self.transform(rgb), self.labels[index]


def time_epoch(loader: DataLoader, to_float: bool) -> float:
    """Seconds to draw every batch once (uint8 batches converted to float [0, 1] as the trainer does)."""
    start = time.perf_counter()
    for images, _ in loader:
        if to_float:
            images = images.float().div_(255.0)
    return time.perf_counter() - start


def naive_loader(workspace: Workspace, rows: pd.DataFrame, workers: int) -> DataLoader:
    paths = [workspace.root / str(p) for p in rows["path"]]
    labels = [LABELS.index(str(label)) for label in rows["label"]]
    return DataLoader(NaiveImages(paths, labels), batch_size=BATCH, shuffle=True, num_workers=workers)


def cache_loader(workspace: Workspace, rows: pd.DataFrame, workers: int, augment: AugmentConfig | None) -> DataLoader:
    """The trainer's own Dataset (CachedImages) and DataLoader (make_loader), epoch 1."""
    config = TrainConfig(image_size=SIZE, batch_size=BATCH, num_workers=workers, augment=augment or AugmentConfig())
    labels = [LABELS.index(str(label)) for label in rows["label"]]
    transform = build_augmentation(config.augment) if augment is not None else None
    dataset = CachedImages(workspace, rows["sha256"].astype(str).tolist(), labels, SIZE, transform, 0)
    loader = make_loader(dataset, config, shuffle=True, device="cpu")
    loader.sampler.set_epoch(1)
    dataset.epoch = 1
    return loader


def time_preprocess(workspace: Workspace, catalog: pd.DataFrame, workers: int | None) -> float:
    """Seconds to build the tensor cache from scratch (the cache is deleted first)."""
    shutil.rmtree(workspace.cache / "tensors", ignore_errors=True)
    start = time.perf_counter()
    preprocess.preprocess_images(workspace, catalog, SIZE, workers=workers)
    return time.perf_counter() - start


def data_paths(workspace: Workspace, rows: pd.DataFrame, workers: int, repeats: int) -> dict[str, float]:
    """images/s of one epoch: naive vs cache (no augmentation, default augmentation, + blur and JPEG at p=1)."""
    n = len(rows)
    variants = {
        "naive_pil_images_per_s": lambda: naive_loader(workspace, rows, workers),
        "cache_no_augment_images_per_s": lambda: cache_loader(workspace, rows, workers, None),
        "cache_default_augment_images_per_s": lambda: cache_loader(workspace, rows, workers, AugmentConfig()),
        "cache_augment_blur_jpeg_images_per_s": lambda: cache_loader(
            workspace, rows, workers, AugmentConfig(blur_p=1.0, jpeg_p=1.0)
        ),
    }
    for make in variants.values():
        make().dataset[0]  # warm-up: first calls of PIL/torchvision kernels and lazy imports are slow
    best: dict[str, float] = {}
    for _ in range(repeats):  # interleaved; best of each, less noise from other load on the machine
        for name, make in variants.items():
            loader = make()
            seconds = time_epoch(loader, to_float=name != "naive_pil_images_per_s")
            del loader  # stops persistent workers
            best[name] = min(best.get(name, float("inf")), seconds)
    result = {name: round(n / seconds, 2) for name, seconds in best.items()}
    naive = result["naive_pil_images_per_s"]
    result["speedup_default_augment_vs_naive"] = round(result["cache_default_augment_images_per_s"] / naive, 2)
    result["speedup_blur_jpeg_vs_naive"] = round(result["cache_augment_blur_jpeg_images_per_s"] / naive, 2)
    return result


def train_steps(name: str, device: str, batch: int, steps: int) -> float:
    """images/s of full training steps (forward, backward, SGD) at SIZE on random tensors, weights none."""
    torch.manual_seed(0)
    model = build_model(name, "none")[0].to(device)
    inputs = torch.rand(batch, 3, SIZE, SIZE, device=device)
    targets = torch.randint(0, 2, (batch,), device=device)
    if device == "cuda":
        model = model.to(memory_format=torch.channels_last)
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    model.train()

    precision = devices.resolve_precision("auto", device)  # bf16 on cuda, fp32 on the cpu, as the trainer

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with devices.autocast(device, precision):
            loss = criterion(model(inputs).float(), targets)
        loss.backward()
        optimizer.step()

    step()  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="8 images, one pass, workers 0 only, one training step of batch 2"
    )
    parser.add_argument("--repeats", type=int, default=None, help="epochs per data path, best kept (2; --quick 1)")
    parser.add_argument("-n", type=int, default=None, help="number of images (default 64, --quick 8)")
    parser.add_argument("--workers", type=int, nargs="+", default=None, help="DataLoader workers (default 0 2)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    n = args.n or (8 if args.quick else 64)
    repeats = max(1, args.repeats or (1 if args.quick else 2))
    worker_counts = args.workers or ([0] if args.quick else [0, 2])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        log.info("generating %d %dx%d JPEGs ...", n, WIDTH, HEIGHT)
        workspace, catalog = make_workspace(Path(tmp) / "ws", n)
        mean_bytes = int(np.mean([(workspace.root / str(p)).stat().st_size for p in catalog["path"]]))
        preprocess_one_s = time_preprocess(workspace, catalog, workers=1)
        preprocess_s = time_preprocess(workspace, catalog, workers=None)
        log.info("preprocess: %.2f s one process, %.2f s default workers", preprocess_one_s, preprocess_s)
        rows = catalog.sort_values("sha256").reset_index(drop=True)
        loaders = {}
        for workers in worker_counts:
            loaders[f"workers_{workers}"] = data_paths(workspace, rows, workers, repeats)
            log.info("workers=%d: %s", workers, loaders[f"workers_{workers}"])
    batch = 2 if args.quick else BATCH if device == "cpu" else 64
    steps = 1 if args.quick else 3
    training = {}
    for name in ("resnet18", "resnet50"):
        training[f"{name}_train_images_per_s"] = round(train_steps(name, device, batch, steps), 2)
        log.info("%s: %.2f images/s", name, training[f"{name}_train_images_per_s"])
    summary = {
        "benchmark": "data_path",
        "quick": args.quick,
        "device": device if device == "cpu" else torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "n_images": n,
        "source_size": [WIDTH, HEIGHT],
        "jpeg_quality": QUALITY,
        "mean_file_bytes": mean_bytes,
        "image_size": SIZE,
        "batch_size": BATCH,
        "repeats_best_of": repeats,
        "preprocess_one_process_s": round(preprocess_one_s, 3),
        "preprocess_one_process_images_per_s": round(n / preprocess_one_s, 2),
        "preprocess_default_workers_s": round(preprocess_s, 3),
        "preprocess_default_workers_images_per_s": round(n / preprocess_s, 2),
        "preprocess_pool_used": n >= preprocess.POOL_THRESHOLD and (os.cpu_count() or 1) > 1,
        "epoch": loaders,
        "train_step": {"batch_size": batch, "timed_steps": steps, "autocast_bf16": device == "cuda", **training},
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
