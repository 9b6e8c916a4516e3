"""Benchmark: near-duplicate pair search (pipeline_lib.curate.dedup.find_near_pairs) against a numpy brute force.

Prints one JSON object on stdout; progress goes to stderr.
Usage: .venv/bin/python benchmarks/bench_near_search.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
import time

import numpy as np

from pipeline_lib.curate.dedup import _plan_vectorised, find_near_pairs

log = logging.getLogger("bench_near_search")

THRESHOLD = 6
BITS = 64
PLANTED_FRACTION = 0.01
BRUTE_SAMPLE_ROWS = 2000


def popcount(values: np.ndarray) -> np.ndarray:
    """Set bits of each uint64 (np.bitwise_count when available, else a byte lookup table)."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(values)
    table = np.array([bin(v).count("1") for v in range(256)], dtype=np.uint8)
    return table[values.view(np.uint8).reshape(-1, 8)].sum(axis=1, dtype=np.uint8)


def make_hashes(n: int, seed: int) -> tuple[np.ndarray, set[tuple[int, int]]]:
    """n random 64-bit hashes; PLANTED_FRACTION of them get a partner at distance 1..THRESHOLD."""
    rng = np.random.default_rng(seed)
    values = rng.integers(0, 2**64, size=n, dtype=np.uint64)
    n_planted = int(n * PLANTED_FRACTION)
    chosen = rng.choice(n, size=2 * n_planted, replace=False)
    planted: set[tuple[int, int]] = set()
    for source, target in zip(chosen[:n_planted], chosen[n_planted:], strict=True):
        flips = rng.choice(BITS, size=int(rng.integers(1, THRESHOLD + 1)), replace=False)
        mask = np.uint64(sum(1 << int(bit) for bit in flips))
        values[target] = values[source] ^ mask
        planted.add((int(min(source, target)), int(max(source, target))))
    return values, planted


def brute_force_rows(values: np.ndarray, rows: np.ndarray) -> list[tuple[int, int]]:
    """Pairs (i, j), i < j, i in rows, within THRESHOLD: XOR + popcount of row i against all later hashes."""
    pairs: list[tuple[int, int]] = []
    for i in rows:
        close = np.nonzero(popcount(values[i + 1 :] ^ values[i]) <= THRESHOLD)[0]
        pairs.extend((int(i), int(i) + 1 + int(j)) for j in close)
    return pairs


def time_brute_force(values: np.ndarray, seed: int) -> tuple[float, bool, list[tuple[int, int]] | None]:
    """Seconds for the full brute force (run fully up to 10k, else estimated from a row sample)."""
    n = len(values)
    if n <= 10_000:
        start = time.perf_counter()
        pairs = brute_force_rows(values, np.arange(n))
        return time.perf_counter() - start, False, pairs
    rows = np.random.default_rng(seed).choice(n, size=BRUTE_SAMPLE_ROWS, replace=False)
    start = time.perf_counter()
    brute_force_rows(values, rows)
    elapsed = time.perf_counter() - start
    # Row i compares against n - 1 - i others; scale by total comparisons over sampled comparisons.
    sampled = float(np.sum(n - 1 - rows))
    return elapsed * (n * (n - 1) / 2) / sampled, True, None


def run_size(n: int, seed: int) -> dict[str, object]:
    """Time find_near_pairs and the brute force on n hashes; check recall (and exactness at 10k)."""
    values, planted = make_hashes(n, seed)
    as_ints = values.tolist()
    log.info("n=%d: find_near_pairs ...", n)
    start = time.perf_counter()
    found = find_near_pairs(as_ints, THRESHOLD)
    seconds = time.perf_counter() - start
    recall = len(planted & set(found)) / len(planted) if planted else 1.0
    log.info("n=%d: %.2f s, %d pairs; brute force ...", n, seconds, len(found))
    brute_seconds, estimated, brute_pairs = time_brute_force(values, seed)
    result: dict[str, object] = {
        "n": n,
        "chunks": _plan_vectorised(n, BITS, THRESHOLD),
        "find_near_pairs_s": round(seconds, 3),
        "pairs_found": len(found),
        "planted_pairs": len(planted),
        "recall_planted": recall,
        "brute_force_s": round(brute_seconds, 3),
        "brute_force_estimated": estimated,
        "speedup": round(brute_seconds / seconds, 1),
    }
    if brute_pairs is not None:
        result["equals_brute_force"] = sorted(brute_pairs) == found
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="sizes 10k and 100k only")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    sizes = [10_000, 100_000] if args.quick else [10_000, 100_000, 1_000_000]
    results = [run_size(n, seed) for seed, n in enumerate(sizes)]
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    summary = {
        "benchmark": "near_search",
        "quick": args.quick,
        "threshold": THRESHOLD,
        "bits": BITS,
        "planted_fraction": PLANTED_FRACTION,
        "cpu_count": os.cpu_count(),
        "numpy": np.__version__,
        "popcount": "np.bitwise_count" if hasattr(np, "bitwise_count") else "byte lookup table",
        "brute_force": "numpy XOR + popcount, one row against all later rows",
        "brute_force_sample_rows": BRUTE_SAMPLE_ROWS,
        "peak_rss_mib": round(peak_mib, 1),
        "sizes": results,
        "all_recall_1": all(r["recall_planted"] == 1.0 for r in results),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
