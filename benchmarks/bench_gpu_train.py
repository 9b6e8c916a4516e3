"""Benchmark: ResNet50 training images/s on one CUDA GPU: fp32, tf32, bf16 autocast + channels_last (+ compile).

Synthetic tensors already on the device (measures the model step, not the data path), warm-up steps, then timed
steps between torch.cuda.synchronize() calls. Prints one JSON object on stdout; progress goes to stderr.
Without CUDA it prints {"skipped": "no CUDA device"} and exits 0.
Usage: .venv/bin/python benchmarks/bench_gpu_train.py [--compile] [--batch 128] [--warmup 10] [--steps 30]
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

from pipeline_lib.models import build_model

log = logging.getLogger("bench_gpu_train")


@dataclass(frozen=True)
class Variant:
    """One way to run the training step."""

    name: str
    tf32: bool
    bf16: bool
    channels_last: bool
    compiled: bool


VARIANTS = (
    Variant("fp32", tf32=False, bf16=False, channels_last=False, compiled=False),
    Variant("tf32", tf32=True, bf16=False, channels_last=False, compiled=False),
    Variant("bf16_channels_last", tf32=True, bf16=True, channels_last=True, compiled=False),
)
COMPILED = Variant("bf16_channels_last_compile", tf32=True, bf16=True, channels_last=True, compiled=True)


def set_tf32(enabled: bool) -> None:
    """TF32 for fp32 matmuls and convolutions on or off (new precision API where it exists)."""
    if hasattr(torch.backends.cuda.matmul, "fp32_precision") and hasattr(torch.backends.cudnn, "conv"):
        precision = "tf32" if enabled else "ieee"
        torch.backends.cuda.matmul.fp32_precision = precision
        torch.backends.cudnn.conv.fp32_precision = precision
    else:
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def autocast(variant: Variant) -> contextlib.AbstractContextManager:
    """A fresh bf16 autocast context for bf16 variants, else a no-op."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if variant.bf16 else contextlib.nullcontext()


def measure(variant: Variant, model_name: str, batch: int, size: int, warmup: int, steps: int) -> dict[str, float]:
    """images/s, ms per step, peak memory and the final loss of one variant."""
    set_tf32(variant.tf32)
    torch.manual_seed(0)
    model = build_model(model_name, "none")[0].cuda()
    inputs = torch.rand(batch, 3, size, size, device="cuda")
    targets = torch.randint(0, 2, (batch,), device="cuda")
    if variant.channels_last:
        model = model.to(memory_format=torch.channels_last)
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    forward = torch.compile(model) if variant.compiled else model
    criterion = nn.CrossEntropyLoss()

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with autocast(variant):
            loss = criterion(forward(inputs).float(), targets)
        loss.backward()
        optimizer.step()
        return loss.detach()

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(warmup):  # cudnn autotuning, allocator growth, compilation
        step()
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(steps):
        loss = step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    final_loss = float(loss.item())
    if not math.isfinite(final_loss):
        raise FloatingPointError(f"{variant.name}: loss became {final_loss}")
    result = {
        "images_per_s": round(batch * steps / seconds, 1),
        "ms_per_step": round(1000 * seconds / steps, 2),
        "warmup_s": round(warmup_s, 2),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "final_loss": round(final_loss, 4),
    }
    return result


def release(variant: Variant) -> None:
    """Free the finished variant's memory (and compiled graphs) before the next one."""
    gc.collect()
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
    args = parser.parse_args()
    if args.batch < 1 or args.steps < 1 or args.warmup < 0 or args.size < 32:
        parser.error("need --batch >= 1, --steps >= 1, --warmup >= 0 and --size >= 32")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    if not torch.cuda.is_available():
        print(json.dumps({"skipped": "no CUDA device"}))
        return
    torch.backends.cudnn.benchmark = True
    variants = [*VARIANTS, COMPILED] if args.compile else list(VARIANTS)
    results = {}
    for variant in variants:
        log.info("%s: %d warm-up + %d timed steps at batch %d ...", variant.name, args.warmup, args.steps, args.batch)
        results[variant.name] = measure(variant, args.model, args.batch, args.size, args.warmup, args.steps)
        release(variant)
        log.info("%s: %s", variant.name, results[variant.name])
    set_tf32(False)
    base = results["fp32"]["images_per_s"]
    summary = {
        "benchmark": "gpu_train",
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
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
