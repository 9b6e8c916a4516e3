"""Benchmark: the reference recipe's wall time on one GPU, from the tensor cache to the registered model with its
report, against the same run with the naive data path, in the same process.

Generates N (900) photo-like JPEGs, half `real` and half `ai`, 10 per group, in two folders; runs the real pipeline
(`flows.pipeline.run_pipeline`) with configs/default.yaml's train/evaluate/report settings (ResNet50, 5 head-only
epochs then all layers, up to 30 epochs; review off, folder sources only, random initial weights unless
`--weights`), on a Prefect ephemeral server and MLflow on SQLite in a temporary folder. `recipe_s` is the pipeline's
time minus its data stages (crawl, ingest, fingerprint, dedup, review, split), i.e. preprocess (tensor cache), train,
evaluate (+ calibration, robustness, CAM summary), report and registration. The run uses this release's defaults on
CUDA (augmentation on the GPU, num_workers auto, bf16/fp16 autocast); the naive run augments in 2 CPU loader
workers (`augment_on: loader`, `num_workers: 2`, the old defaults) in a fresh workspace. By default patience equals
the epoch count, so every run trains all epochs (the worst case; `--patience 5` is the recipe's early stopping).
Prints one JSON object on stdout; progress on stderr. Target on one H100-class GPU: recipe_s < 120.
Without CUDA it prints {"skipped": "no CUDA device"} and exits 0; --quick (or --smoke) runs the whole pipeline once
with tiny sizes on the CPU, with or without CUDA, and only builds the naive run's config (checks that the script
works, measures nothing useful).
Usage: .venv/bin/python benchmarks/bench_reference_recipe.py [-n 900] [--epochs 30] [--patience 30]
       [--weights none|imagenet|FILE] [--no-naive] [--quick]
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
from typing import Any

import torch
from synthetic import photo_like_image

from pipeline_lib.core import privacy

privacy.quiet_mlflow()  # before MLflow is imported: nothing leaves the machine (Prefect's server: prefect_session)

from pipeline_lib.core.config import PipelineConfig  # noqa: E402
from pipeline_lib.core.config_loader import build_config, merge_mappings, read_yaml_mapping  # noqa: E402
from pipeline_lib.core.tracking.runs import Tracker, run_summary  # noqa: E402
from pipeline_lib.core.tracking.stage_runs import stage_runs  # noqa: E402

log = logging.getLogger("bench_reference_recipe")
DEFAULT_YAML = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"
DATA_STAGES = ("crawl", "ingest", "fingerprint", "dedup", "review", "split")
PER_GROUP = 10
NAIVE = ["train.augment_on=loader", "train.num_workers=2"]


def make_images(root: Path, n: int, per_group: int = PER_GROUP) -> dict[str, Path]:
    """n JPEGs (512x384, quality 90) under root/<label>/<group>/, half per label, per_group per group."""
    folders = {label: root / label for label in ("real", "ai")}
    for index in range(n):
        label = "ai" if index % 2 else "real"
        group = folders[label] / f"g{index // (2 * per_group):03d}"
        group.mkdir(parents=True, exist_ok=True)
        photo_like_image(index, 512, 384, max_shape=150).save(group / f"{index}.jpg", "JPEG", quality=90)
    return folders


def recipe_config(folders: dict[str, Path], root: Path, overrides: list[str]) -> PipelineConfig:
    """configs/default.yaml with the generated folders as the only sources, review off, everything in root."""
    data = read_yaml_mapping(DEFAULT_YAML)
    sources = [{"path": str(path), "label": label, "group_by": "folder"} for label, path in folders.items()]
    data = merge_mappings(data, {"review": {"mode": "off"}, "execution": {"workspace": str(root / "ws")}})
    data["sources"] = {"folders": sources}
    data = merge_mappings(data, {"tracking": {"uri": f"sqlite:///{root / 'mlflow.db'}"}})
    return build_config(data, overrides, origin="bench_reference_recipe")


def timed_run(config: PipelineConfig) -> dict[str, Any]:
    """Run the pipeline; its total seconds, the seconds of each stage, and the recipe's share."""
    from flows.pipeline import run_pipeline
    from flows.runtime import prefect_session

    started = time.perf_counter()
    with prefect_session():  # as `aidetect run`: a kept-up server, else a temporary one (a generous start-up limit)
        summary = run_pipeline(config)
    wall = time.perf_counter() - started
    stages = stage_runs(Tracker(summary["tracking_uri"], summary["mlflow_run_id"]))
    seconds = {name: round(run["metrics"].get("stage.seconds", 0.0), 2) for name, run in stages.items()}
    data_s = sum(seconds.get(name, 0.0) for name in DATA_STAGES)
    logged = run_summary(summary["tracking_uri"], summary["mlflow_run_id"])["metrics"]
    return {
        "recipe_s": round(summary["seconds"] - data_s, 2),
        "pipeline_s": summary["seconds"],
        "wall_s_incl_prefect_start": round(wall, 2),
        "stage_seconds": seconds,
        "epochs_run": int(logged.get("train.epoch", 0)),  # the last epoch's number
        "best_epoch": int(logged.get("train.best_epoch", 0)),
        "test_accuracy": round(float(summary["metrics"]["accuracy"]), 4),
        "registered_version": summary["registry"].get("version"),
        "report_written": Path(summary["report"]).is_file(),
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=900, help="images, half real and half ai (default 900)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--patience", type=int, default=None, help="early stopping patience (default: --epochs)")
    parser.add_argument("--weights", default="none", help="none (default), imagenet (TORCH_HOME's cache) or a file")
    parser.add_argument("--no-naive", action="store_true", help="skip the run with augmentation in 2 CPU workers")
    parser.add_argument(
        "--quick", "--smoke", dest="quick", action="store_true", help="tiny sizes on the CPU: checks the script"
    )
    return parser.parse_args()


def overrides_for(args: argparse.Namespace) -> list[str]:
    """The config overrides of this run (the recipe, or tiny CPU settings with --quick)."""
    epochs = 2 if args.quick else args.epochs
    common = [f"train.epochs={epochs}", f"train.patience={args.patience or epochs}", f"train.weights={args.weights}"]
    if not args.quick:
        return common + ["train.device=cuda"]
    tiny = ["train.model=resnet18", "train.image_size=32", "train.batch_size=8", "train.head_only_epochs=1"]
    tiny += ["train.device=cpu", "train.num_workers=0", "train.augment_on=device", "evaluate.bootstrap=20"]
    split = ["split.train=0.6", "split.val=0.2", "split.test=0.2", "split.min_groups_per_label=2"]  # 6/2/2 groups
    return common + tiny + split + ["report.images_per_cell=1", "audit.enabled=false"]


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    if not args.quick and not torch.cuda.is_available():
        print(json.dumps({"skipped": "no CUDA device"}))
        return
    n = 40 if args.quick else args.n  # --quick: 10 groups of 2 per label
    overrides = overrides_for(args)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        log.info("generating %d JPEGs ...", n)
        folders = make_images(root / "images", n, 2 if args.quick else PER_GROUP)
        runs = {"project": timed_run(recipe_config(folders, root / "project", overrides))}
        log.info("project defaults: %s", runs["project"])
        naive = overrides + (["train.num_workers=0", "train.augment_on=loader"] if args.quick else NAIVE)
        naive_config = recipe_config(folders, root / "naive", naive)  # --quick: checked, not run (the same path)
        if not args.no_naive and not args.quick:
            runs["naive"] = timed_run(naive_config)
            log.info("naive data path: %s", runs["naive"])
    summary = {
        "benchmark": "reference_recipe",
        "quick": args.quick,
        "device": torch.cuda.get_device_name(0) if not args.quick else "cpu",
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "n_images": n,
        "overrides": overrides,
        "runs": runs,
        "recipe_s": runs["project"]["recipe_s"],
    }
    if "naive" in runs:
        summary["naive_recipe_s"] = runs["naive"]["recipe_s"]
        summary["speedup_vs_naive"] = round(runs["naive"]["recipe_s"] / max(runs["project"]["recipe_s"], 1e-9), 2)
    print(json.dumps(summary, default=str))


if __name__ == "__main__":
    main()
