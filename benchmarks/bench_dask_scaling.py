"""Benchmark: the per-image stages on a local Dask cluster of 1, 2 and 4 worker processes, next to the in-process
thread pool, over the same images.

Each configuration runs the pipeline's own stages (crawl a folder -> ingest -> fingerprint -> preprocess, the chunk
tasks mapped on the configured runner) in a flow, in a fresh workspace (nothing cached), with the same chunks. The
clusters are started, and their workers import the task code, before the timed part. Prints one JSON object on
stdout; progress goes to stderr.
Usage: .venv/bin/python benchmarks/bench_dask_scaling.py [-n IMAGES] [--chunk-size K] [--workers 1 2 4] [--quick]
--quick: 4 images of 400x300 in chunks of 2, one cluster of 1 worker: every path, to check the script.
The flows report to the Prefect server at PREFECT_API_URL when it is set (the test suite's harness), else to Prefect's
test harness started here.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pipeline_lib.core import privacy

os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
privacy.quiet_prefect_server()  # before Prefect and MLflow are imported: nothing leaves the machine
privacy.quiet_mlflow()

from distributed import Client, LocalCluster  # noqa: E402
from prefect import flow  # noqa: E402
from prefect.settings import PREFECT_HOME, temporary_settings  # noqa: E402
from prefect.testing.utilities import prefect_test_harness  # noqa: E402
from synthetic import photo_like_image  # noqa: E402

from flows.pipeline import fingerprint_stage, ingest_stage, preprocess_stage, tracked_stages  # noqa: E402
from pipeline_lib.core.catalog import read_snapshot, write_snapshot  # noqa: E402
from pipeline_lib.core.config import PipelineConfig  # noqa: E402
from pipeline_lib.core.config_loader import build_config  # noqa: E402
from pipeline_lib.core.workspace import Workspace  # noqa: E402
from tasks import stages  # noqa: E402

log = logging.getLogger("bench_dask_scaling")
WIDTH, HEIGHT, QUALITY, TENSOR_SIZE = 1600, 1200, 90, 224
QUICK_SIZE = (400, 300)
STAGES = ("ingest", "fingerprint", "preprocess")


@flow(name="bench-per-image-stages")
def per_image_flow(config: PipelineConfig) -> dict[str, Any]:
    """Crawl the folder (not timed), then the three per-image stages, each timed from plan to merge."""
    seconds: dict[str, float] = {}
    chunk_size = config.execution.chunk_size
    with tracked_stages(config, "bench", {"aidetect.kind": "bench"}) as (workspace, run, _):
        crawled = run.run("crawl", stages.crawl_sources, str(workspace.root), config.sources, cache=False)
        started = time.perf_counter()
        ingested = run.record("ingest", ingest_stage(workspace, False, crawled.catalog, config.ingest, chunk_size), 0)
        seconds["ingest"] = time.perf_counter() - started
        started = time.perf_counter()
        state = fingerprint_stage(workspace, False, ingested.catalog, config.dedup, chunk_size)
        hashed = run.record("fingerprint", state, 0)
        seconds["fingerprint"] = time.perf_counter() - started
        table = read_snapshot(workspace, hashed.catalog)
        split = write_snapshot(workspace, "split", table.assign(split="train"))
        started = time.perf_counter()
        run.record("preprocess", preprocess_stage(workspace, False, split, TENSOR_SIZE, None, chunk_size), 0)
        seconds["preprocess"] = time.perf_counter() - started
    return {"seconds": seconds, "catalog": hashed.catalog, "root": str(workspace.root)}


def make_images(folder: Path, n: int, size: tuple[int, int]) -> None:
    """n photo-like JPEGs of size in 8 sub-folders (groups)."""
    for seed in range(n):
        path = folder / f"g{seed % 8}" / f"img{seed:04d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        photo_like_image(seed, *size, max_shape=size[0] // 4).save(path, "JPEG", quality=QUALITY)


def config_for(images: Path, root: Path, chunk_size: int, execution: dict[str, Any]) -> PipelineConfig:
    """A config that reads the folder of images into a fresh workspace at root, with the given execution keys."""
    mapping = {
        "sources": {"folders": [{"path": str(images), "label": "real"}]},
        "execution": {"workspace": str(root), "chunk_size": chunk_size, **execution},
        "tracking": {"uri": f"sqlite:///{root.parent / 'mlflow.db'}", "system_metrics_interval_s": 0},
    }
    return build_config(mapping, origin="bench")


def measure(config: PipelineConfig, n: int) -> dict[str, Any]:
    """One flow run: seconds and images/s per stage and over the three stages, and its fingerprint catalog."""
    result = per_image_flow(config)
    total = sum(result["seconds"].values())
    table = read_snapshot(Workspace.open(Path(result["root"])), result["catalog"])
    return {
        "seconds": {stage: round(result["seconds"][stage], 3) for stage in STAGES},
        "images_per_s": {stage: round(n / result["seconds"][stage], 1) for stage in STAGES},
        "total_seconds": round(total, 3),
        "total_images_per_s": round(n / total, 1),
        "_hashes": table[["sha256", "phash", "dhash"]].sort_values("sha256").reset_index(drop=True),
    }


def on_cluster(images: Path, work: Path, chunk_size: int, workers: int, n: int) -> dict[str, Any]:
    """The flow with its chunks on a fresh LocalCluster of `workers` single-threaded processes (started untimed)."""
    kwargs = {"n_workers": workers, "threads_per_worker": 1, "processes": True, "dashboard_address": None}
    with LocalCluster(host="127.0.0.1", **kwargs) as cluster, Client(cluster) as client:
        client.run(__import__, "tasks.per_image")  # the workers import the task code before the timed part
        execution = {"task_runner": "dask", "dask_address": cluster.scheduler_address}
        return measure(config_for(images, work / f"dask-{workers}" / "ws", chunk_size, execution), n)


def prefect_server() -> contextlib.AbstractContextManager:
    """The server at PREFECT_API_URL when one is set, else Prefect's test harness (on a busy machine its server's
    first answer can take minutes)."""
    return contextlib.nullcontext() if os.environ.get("PREFECT_API_URL") else prefect_test_harness(480)


def parse_args() -> argparse.Namespace:
    """The options, with --quick's tiny sizes filled in where not given."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=None, help="images (default 192; --quick 4)")
    parser.add_argument("--chunk-size", type=int, default=None, help="images per chunk task (default 16; --quick 2)")
    parser.add_argument("--workers", type=int, nargs="+", default=None, help="cluster sizes (default 1 2 4; --quick 1)")
    parser.add_argument("--quick", action="store_true", help="a tiny run through every path: checks the script")
    args = parser.parse_args()
    args.n = args.n or (4 if args.quick else 192)
    args.chunk_size = args.chunk_size or (2 if args.quick else 16)
    args.workers = args.workers or ([1] if args.quick else [1, 2, 4])
    args.size = QUICK_SIZE if args.quick else (WIDTH, HEIGHT)
    return args


def main() -> None:
    args = parse_args()
    handler = logging.StreamHandler(sys.stderr)  # Prefect configures the root logger on import: a handler of our own
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-dask-") as tmp:
        work, images = Path(tmp), Path(tmp) / "images"
        log.info("generating %d JPEGs of %dx%d", args.n, *args.size)
        make_images(images, args.n, args.size)
        with temporary_settings({PREFECT_HOME: str(work / "prefect-home")}), prefect_server():
            log.info("threads (in-process)")
            in_process = config_for(images, work / "threads" / "ws", args.chunk_size, {"max_workers": os.cpu_count()})
            threads = measure(in_process, args.n)
            clusters = {}
            for workers in args.workers:
                log.info("dask: %d worker process(es)", workers)
                clusters[workers] = on_cluster(images, work, args.chunk_size, workers, args.n)
    print(json.dumps(report(args, threads, clusters, load), indent=2))


def report(args: argparse.Namespace, threads: dict[str, Any], clusters: dict[int, dict[str, Any]], load: float) -> dict:
    """The JSON: each configuration's figures, the scaling ratios, and whether every run hashed the same."""
    base = clusters[min(clusters)]["total_images_per_s"]
    same = all(result["_hashes"].equals(threads["_hashes"]) for result in clusters.values())
    strip = lambda result: {k: v for k, v in result.items() if not k.startswith("_")}  # noqa: E731
    return {
        "benchmark": "dask_scaling",
        "quick": args.quick,
        "images": args.n,
        "image_pixels": f"{args.size[0]}x{args.size[1]} JPEG q{QUALITY}",
        "tensor_size": TENSOR_SIZE,
        "chunk_size": args.chunk_size,
        "chunks_per_stage": -(-args.n // args.chunk_size),
        "cpu_count": os.cpu_count(),
        "load_average_1min_at_start": round(load, 2),
        "threads_in_process": {"workers": os.cpu_count(), **strip(threads)},
        "dask_local_cluster": {str(k): {"worker_processes": k, **strip(v)} for k, v in clusters.items()},
        "dask_scaling_vs_smallest_cluster": {
            str(k): round(v["total_images_per_s"] / base, 2) for k, v in clusters.items()
        },
        "dask_vs_threads": {
            str(k): round(v["total_images_per_s"] / threads["total_images_per_s"], 2) for k, v in clusters.items()
        },
        "same_hashes_everywhere": bool(same),
    }


if __name__ == "__main__":
    main()
