"""Benchmark: frozen foundation backbones with a probe against ResNet50 fine-tuning, on the same images.

Generates N (128) photo-like 512x384 JPEGs, half `real` and half `ai`, 80% train and 20% val, stored in a temporary
workspace. For each backbone (default: resnet50, clip_vit_b16, clip_vit_l14, dinov2_vitb14) it measures, through
the project's own code (learn/probe.py, learn/features.py):

- `embed_images_per_s`: the cold embedding throughput (every image decoded and embedded, features.embed, batch 32);
  `cached_read_images_per_s`: the same call again, every vector read from the feature cache.
- `head_fit_threads`: fit_head on 1,000 x 768 random features for 20 epochs on one thread (what the probe uses,
  probe.HEAD_THREADS) and on `--threads`: the head's operations are too small to split.
- `probe_retrain_s`: train.train_model in probe mode once the features are cached (the backbone built, its weights
  digested, every vector read, the linear head trained, the checkpoint written); `probe_fit_s` the head's training
  alone; `probe_retrain_mlp_s` the same with an MLP head (other head settings: nothing is embedded);
  `probe_train_cold_s_estimate` = the cold embedding + probe_retrain_s (a first run on an empty cache);
  `recrawl`: 10% new images added, trained again: the vectors `computed` and `reused`, and the seconds.

and, as the naive way (the recipe's), ResNet50 fine-tuned on the same train/val images (train_model in finetune mode,
one head-only epoch and one all-layers epoch): `finetune_head_epoch_s`, `finetune_all_epoch_s` and
`finetune_recipe_max_s` = 5 head-only + 25 all-layers epochs (configs/default.yaml's 30 epochs without early
stopping: an upper bound, extrapolated from the two measured epochs).

Weights: each backbone's published file when it is in TORCH_HOME's cache, else random weights of the same
architecture: throughput and training time do not depend on the weights' values (the JSON says which was used).
Runs on `--threads` (2) CPU threads by default, or `--device cuda`. The load average before and after is reported:
on a shared machine the figures are upper bounds of the time an idle machine needs.
Prints one JSON object on stdout; progress on stderr.
--quick: tiny models of the same classes and 16 images (a few seconds; checks that the script works, measures
nothing useful).
Usage: .venv/bin/python benchmarks/bench_foundation.py [-n 128] [--backbones resnet50 clip_vit_l14 ...]
       [--threads 2] [--device cpu|cuda] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from synthetic import photo_like_image

from pipeline_lib.core import catalog as cat
from pipeline_lib.core.config import ProbeConfig, TrainConfig
from pipeline_lib.core.workspace import Workspace, put_in_store
from pipeline_lib.learn import foundation, models, probe
from pipeline_lib.learn.train import train_model

log = logging.getLogger("bench_foundation")
BACKBONES = ["resnet50", "clip_vit_b16", "clip_vit_l14", "dinov2_vitb14"]
TINY_VISION = {"layers": 1, "width": 32, "patch_size": 8, "image_size": 32, "head_width": 16}
TINY_CLIP = {"embed_dim": 8, "vision_cfg": TINY_VISION}
TINY_DINO = {"img_size": 28, "depth": 1, "embed_dim": 32, "num_heads": 2}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=128, help="images (half real, half ai; 80%% train, 20%% val)")
    parser.add_argument("--backbones", nargs="+", default=BACKBONES, choices=models.MODEL_NAMES)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads torch may use (the 2-core figure)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--quick", action="store_true", help="tiny models and 16 images: checks the script works")
    return parser.parse_args()


def make_rows(workspace: Workspace, n: int, first: int = 0, split_every: int = 5) -> pd.DataFrame:
    """n stored JPEGs as catalog rows: labels alternate, every split_every-th image goes to val."""
    records = []
    for index in range(first, first + n):
        buffer = io.BytesIO()
        photo_like_image(index, 512, 384, max_shape=150).save(buffer, "JPEG", quality=90)
        sha, path = put_in_store(workspace, buffer.getvalue(), "jpg")
        label = "ai" if index % 2 else "real"
        split = "val" if (index // 2) % split_every == 0 else "train"
        records.append({"sha256": sha, "path": workspace.relative(path), "label": label,
                        "group": f"{label}-{index // 20}", "status": "ok", "split": split})  # fmt: skip
    return cat.new_rows(records)


def weights_for(name: str) -> str:
    """'pretrained' when the published file is in TORCH_HOME's cache, else 'none' (random, same architecture)."""
    return "pretrained" if models.pretrained_path(name).is_file() else "none"


def use_tiny_models() -> None:
    """--quick: every foundation spec builds a one-block model of the same class."""
    for name, spec in list(foundation.SPECS.items()):
        if spec.library == "open_clip":
            foundation.SPECS[name] = dataclasses.replace(spec, overrides=TINY_CLIP, input_size=32, patch=8)
        else:
            foundation.SPECS[name] = dataclasses.replace(spec, overrides=TINY_DINO)


def image_size(name: str, quick: bool) -> int:
    """The input size of a backbone in this run: 224, or with --quick the tiny models' own (DINOv2: 28)."""
    if quick:
        return 28 if name.startswith("dinov2") else 32
    return 224


def copy_store(root: Path, workspace: Workspace, *tables: pd.DataFrame) -> None:
    """Store the generated files of tables (kept under root/images) in workspace too."""
    for table in tables:
        for path in table["path"]:
            put_in_store(workspace, (root / "images" / path).read_bytes(), "jpg")


def config_for(name: str, args: argparse.Namespace, **changes: Any) -> TrainConfig:
    values: dict[str, Any] = {"model": name, "weights": weights_for(name), "image_size": image_size(name, args.quick),
                              "batch_size": 32, "device": args.device, "num_workers": 0, "mode": "probe"}  # fmt: skip
    return TrainConfig(**(values | changes))


def timed(function: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - started


def measure_backbone(name: str, rows: pd.DataFrame, extra: pd.DataFrame, root: Path, args: argparse.Namespace):
    """The embedding and probe figures of one backbone, in a workspace of its own (an empty feature cache)."""
    workspace = Workspace.create(root / name)
    copy_store(root, workspace, rows, extra)
    config = config_for(name, args)
    model, _ = probe.build_probe_model(config)  # as train_model builds it: the same (seeded) backbone
    extractor = probe.backbone_extractor(model, config.image_size, batch_size=config.batch_size)
    shas = rows["sha256"].tolist()
    cold, cold_s = timed(probe.embed_rows, workspace, extractor, shas, args.device)
    warm, warm_s = timed(probe.embed_rows, workspace, extractor, shas, args.device)
    assert (cold.computed, warm.reused) == (len(shas), len(shas)), (cold.computed, warm.reused)
    del model, extractor
    linear, linear_s = timed(train_model, workspace, rows, config, root / f"{name}-linear")
    assert linear.features["computed"] == 0, f"{name}: the probe must read the features embedded above"
    mlp = config_for(name, args, probe=ProbeConfig(head="mlp", hidden=256))
    again, again_s = timed(train_model, workspace, rows, mlp, root / f"{name}-mlp")
    grown = pd.concat([rows, extra], ignore_index=True)
    recrawl, recrawl_s = timed(train_model, workspace, grown, config, root / f"{name}-recrawl")
    return {
        "weights": config.weights,
        "feature_dim": int(warm.matrix.shape[1]),
        "embed_images_per_s": round(len(shas) / cold_s, 2),
        "cached_read_images_per_s": round(len(shas) / warm_s, 1),
        "probe_retrain_s": round(linear_s, 2),
        "probe_retrain_features": linear.features,
        "probe_retrain_mlp_s": round(again_s, 2),
        "probe_fit_s": round(sum(e.seconds for e in linear.history), 3),
        "probe_epochs": len(linear.history),
        "probe_val_accuracy": round(linear.history[linear.best_epoch - 1].val_accuracy, 3),
        "probe_train_cold_s_estimate": round(cold_s + linear_s, 2),
        "recrawl": {"new_images": len(extra), "s": round(recrawl_s, 2)} | recrawl.features,
    }


def measure_finetune(rows: pd.DataFrame, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """ResNet50 (resnet18 with --quick) fine-tuned on the same images: one head-only and one all-layers epoch."""
    name = "resnet18" if args.quick else "resnet50"
    workspace = Workspace.create(root / "finetune")
    copy_store(root, workspace, rows)
    config = config_for(name, args, mode="finetune", epochs=2, head_only_epochs=1, patience=2, lr=0.001)
    result, total_s = timed(train_model, workspace, rows, config, root / "finetune-run")
    head, every = result.history[0].seconds, result.history[1].seconds
    return {
        "model": name,
        "weights": config.weights,
        "finetune_head_epoch_s": round(head, 2),
        "finetune_all_epoch_s": round(every, 2),
        "finetune_two_epochs_with_tensor_cache_s": round(total_s, 2),
        "finetune_recipe_max_s": round(5 * head + 25 * every, 1),
    }


def measure_head_threads(threads: int, n: int = 1000, dim: int = 768, epochs: int = 20) -> dict[str, Any]:
    """fit_head on random features [n, dim] for epochs epochs: on one thread (probe.HEAD_THREADS) and on threads."""
    from pipeline_lib.core.config import ProbeConfig
    from pipeline_lib.learn import heads

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, dim, generator=generator)
    y = (x[:, 0] > 0).long()
    seconds = {}
    for count in dict.fromkeys((1, threads)):
        config = ProbeConfig(epochs=epochs, patience=epochs)
        _, seconds[count] = timed(probe.fit_head, heads.ProbeHead(dim, 2), (x, y), (x[: n // 4], y[: n // 4]), config,
                                  threads=count)  # fmt: skip
    return {"features": [n, dim], "epochs": epochs} | {f"threads_{k}_s": round(v, 2) for k, v in seconds.items()}


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    n = 16 if args.quick else args.n
    if args.quick:
        use_tiny_models()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-foundation-") as folder:
        root = Path(folder)
        images = Workspace.create(root / "images")
        rows = make_rows(images, n)
        extra = make_rows(images, max(1, n // 10), first=n)  # a re-crawl adds 10%
        backbones = {}
        for name in (["resnet18", "clip_vit_b16", "dinov2_vitb14"] if args.quick else args.backbones):
            log.info("backbone %s", name)
            backbones[name] = measure_backbone(name, rows, extra, root, args)
        finetune = measure_finetune(rows, root, args)
    head_threads = measure_head_threads(args.threads, n=64 if args.quick else 1000)
    result = {
        "benchmark": "foundation",
        "quick": args.quick,
        "images": n,
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(0),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "weights_note": "'none' means random weights of the real architecture (no file in TORCH_HOME's cache): "
        "throughput and training time do not depend on the weights' values",
        "backbones": backbones,
        "finetune": finetune,
        "head_fit_threads": head_threads,
    }
    for figures in backbones.values():  # how many probe re-trains fit in the recipe's fine-tuning (upper bound)
        figures["finetune_recipe_max_over_probe_retrain"] = round(
            finetune["finetune_recipe_max_s"] / max(figures["probe_retrain_s"], 1e-9), 1
        )
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
