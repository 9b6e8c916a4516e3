"""Benchmark: ResNet50 training images/s on one CUDA GPU: fp32, tf32, bf16 or fp16 autocast + channels_last
(+ compile).

Synthetic tensors already on the device (measures the model step, not the data path), warm-up steps, then timed
steps between torch.cuda.synchronize() calls. Prints one JSON object on stdout; progress goes to stderr.
Without CUDA it prints {"skipped": "no CUDA device"} and exits 0; --quick (or --smoke) runs the fp32 step of a tiny
resnet18 on the CPU instead, with or without CUDA (checks that the script works, measures nothing useful).
Usage: .venv/bin/python benchmarks/bench_gpu_train.py [--compile] [--batch 128] [--warmup 10] [--steps 30] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn

from pipeline_lib.core import devices
from pipeline_lib.learn.models import build_model

log = logging.getLogger("bench_gpu_train")


@dataclass(frozen=True)
class Variant:
    """One way to run the training step."""

    name: str
    tf32: bool
    precision: str  # fp32 | bf16 | fp16 (fp16 steps through a GradScaler, as train does)
    channels_last: bool
    compiled: bool


VARIANTS = (
    Variant("fp32", tf32=False, precision="fp32", channels_last=False, compiled=False),
    Variant("tf32", tf32=True, precision="fp32", channels_last=False, compiled=False),
    Variant("bf16_channels_last", tf32=True, precision="bf16", channels_last=True, compiled=False),
    Variant("fp16_channels_last", tf32=True, precision="fp16", channels_last=True, compiled=False),
)
COMPILED = Variant("bf16_channels_last_compile", tf32=True, precision="bf16", channels_last=True, compiled=True)


def train_variant(precision: str) -> Variant:
    """The variant train runs on CUDA at a resolved precision (bf16 or fp16 + channels_last; fp32 as is)."""
    names = {"bf16": "bf16_channels_last", "fp16": "fp16_channels_last", "fp32": "fp32"}
    return next(variant for variant in VARIANTS if variant.name == names[precision])


def set_tf32(enabled: bool) -> None:
    """TF32 for fp32 matmuls and convolutions on or off (new precision API where it exists)."""
    if hasattr(torch.backends.cuda.matmul, "fp32_precision") and hasattr(torch.backends.cudnn, "conv"):
        precision = "tf32" if enabled else "ieee"
        torch.backends.cuda.matmul.fp32_precision = precision
        torch.backends.cudnn.conv.fp32_precision = precision
    else:
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def autocast(variant: Variant, device: str = "cuda") -> contextlib.AbstractContextManager:
    """A fresh autocast context for bf16/fp16 variants, else a no-op."""
    return devices.autocast(device, variant.precision)


def synchronize(device: str) -> None:
    """Wait for the device's queued work (CUDA); nothing on the CPU."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def measure(
    variant: Variant, model_name: str, batch: int, size: int, warmup: int, steps: int, device: str = "cuda"
) -> dict[str, float]:
    """images/s, ms per step, peak memory (CUDA) and the final loss of one variant."""
    cuda = device.startswith("cuda")
    if cuda:
        set_tf32(variant.tf32)
    torch.manual_seed(0)
    model = build_model(model_name, "none")[0].to(device)
    inputs = torch.rand(batch, 3, size, size, device=device)
    targets = torch.randint(0, 2, (batch,), device=device)
    if variant.channels_last:
        model = model.to(memory_format=torch.channels_last)
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    forward = torch.compile(model) if variant.compiled else model
    criterion = nn.CrossEntropyLoss()
    scaler = devices.grad_scaler(device, variant.precision)

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with autocast(variant, device):
            loss = criterion(forward(inputs).float(), targets)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        return loss.detach()

    synchronize(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(warmup):  # cudnn autotuning, allocator growth, compilation
        step()
    synchronize(device)
    warmup_s = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(steps):
        loss = step()
    synchronize(device)
    seconds = time.perf_counter() - started
    final_loss = float(loss.item())
    if not math.isfinite(final_loss):
        raise FloatingPointError(f"{variant.name}: loss became {final_loss}")
    result = {
        "images_per_s": round(batch * steps / seconds, 1),
        "ms_per_step": round(1000 * seconds / steps, 2),
        "warmup_s": round(warmup_s, 2),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "final_loss": round(final_loss, 4),
    }
    return result


def release(variant: Variant) -> None:
    """Free the finished variant's memory (and compiled graphs) before the next one."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if variant.compiled:
        torch._dynamo.reset()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default="resnet50", choices=["resnet50", "resnet18", "efficientnet_b0", "convnext_tiny"]
    )
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--compile", action="store_true", help="also time bf16 + channels_last + torch.compile")
    parser.add_argument(
        "--quick", "--smoke", dest="quick", action="store_true", help="tiny fp32 resnet18 steps on the CPU (seconds)"
    )
    args = parser.parse_args()
    if args.batch < 1 or args.steps < 1 or args.warmup < 0 or args.size < 32:
        parser.error("need --batch >= 1, --steps >= 1, --warmup >= 0 and --size >= 32")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    if args.quick:
        device, variants = "cpu", [VARIANTS[0]]
        args.model, args.batch, args.size, args.warmup, args.steps = "resnet18", 4, 32, 1, 2
    elif not torch.cuda.is_available():
        print(json.dumps({"skipped": "no CUDA device"}))
        return
    else:
        device = "cuda"
        torch.backends.cudnn.benchmark = True
        bf16 = devices.resolve_precision("auto", device) == "bf16"
        variants = [v for v in VARIANTS if bf16 or v.precision != "bf16"]
        variants += [COMPILED] if args.compile and bf16 else []
    results = {}
    for variant in variants:
        log.info("%s: %d warm-up + %d timed steps at batch %d ...", variant.name, args.warmup, args.steps, args.batch)
        results[variant.name] = measure(variant, args.model, args.batch, args.size, args.warmup, args.steps, device)
        release(variant)
        log.info("%s: %s", variant.name, results[variant.name])
    if device == "cuda":
        set_tf32(False)
    base = results["fp32"]["images_per_s"]
    summary = {
        "benchmark": "gpu_train",
        "quick": args.quick,
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "precision_auto": devices.resolve_precision("auto", device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device == "cuda" else None,
        "cpu_count": os.cpu_count(),
        "model": args.model,
        "batch_size": args.batch,
        "image_size": args.size,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "variants": results,
        "speedup_vs_fp32": {name: round(r["images_per_s"] / base, 2) for name, r in results.items()},
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
