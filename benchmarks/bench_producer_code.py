"""Benchmark: what naming a per-image cache by its code costs per image (a cache path asked once per tensor read).

Compares, in the same run: deriving the producer digest afresh each time (the naive way: a new CodeIndex, so every
reached file is stat-ed, the walk redone, the digest recomputed), the process-wide memo of code_index.producer_code
(a stat per file it was derived from), and the per-image work it sits beside (np.load of one cached 224 px tensor).

Prints one JSON object on stdout. Usage: .venv/bin/python benchmarks/bench_producer_code.py [-n N] [--quick]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time

import numpy as np

from pipeline_lib.acquire import fingerprint
from pipeline_lib.core.code_index import CodeIndex, producer_code, producer_digest
from pipeline_lib.learn import preprocess


def per_call_us(function, n: int) -> float:
    """Mean microseconds of function() over n calls (after one warm-up call)."""
    function()
    started = time.perf_counter()
    for _ in range(n):
        function()
    return round((time.perf_counter() - started) / n * 1e6, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=2000, help="calls per measurement")
    parser.add_argument("--quick", action="store_true", help="a tiny size for CI: every path, figures meaningless")
    args = parser.parse_args()
    if args.quick:
        args.n = 20
    producers = preprocess.TENSOR_PRODUCERS
    started = time.perf_counter()
    first = producer_code(*producers)  # the first call in a process derives it
    first_ms = (time.perf_counter() - started) * 1e3
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((3, 224, 224), dtype=np.uint8))
    data = buffer.getvalue()
    summary = {
        "benchmark": "producer_code",
        "quick": args.quick,
        "cpu_count": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "tensor_code": first,
        "first_call_ms": round(first_ms, 2),
        "naive_fresh_index_us_per_call": per_call_us(
            lambda: producer_digest(*producers, index=CodeIndex()), max(20, args.n // 100)
        ),
        "memo_tensor_code_us_per_call": per_call_us(lambda: producer_code(*producers), args.n),
        "memo_hash_code_us_per_call": per_call_us(fingerprint.hash_code, args.n),
        "np_load_224px_tensor_us_per_call": per_call_us(lambda: np.load(io.BytesIO(data)), args.n),
    }
    summary["memo_speedup_vs_naive"] = round(
        summary["naive_fresh_index_us_per_call"] / summary["memo_tensor_code_us_per_call"], 1
    )
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
