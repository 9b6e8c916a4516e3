"""Benchmark: crawling over loopback at the speed of the network and the decoder.

A loopback HTTP/1.1 server, in its own process, serves N (300; --quick 8) photo-like JPEGs of 2048x1536 (3 MP,
quality 90). On the same URL list, in one run:

- aidetect's crawl stage (`crawl.crawl_sources`: icrawler's UrlListFeeder + the workspace downloader, --threads);
- crawl + ingest as the pipeline runs them: validation chunks mapped on threads (`execution.chunk_size`), each
  file decoded once to validate it and compute its perceptual hashes, then placed in the store, the hashes in
  the fingerprint cache; then the fingerprint stage, which finds nothing left to hash;
- the previous way on the same files: ingest with a full-size decode for validation only, then a fingerprint
  stage that decodes every file again;
- the review stage in `review.mode: auto` (decisions applied, snapshot written), and the same with the review
  pack built as it was before (thumbnails of every image);
- img2dataset (download only: `--resize_mode no --disable_all_reencoding True`, one process, the same thread
  count), timed around its `download()` call (its process pool and sharding included, as our crawl's threads and
  log are), by its own shard statistics (the download inside its worker) and as a whole command, when it is
  installed: in this interpreter, or the one given with --img2dataset-python. Skipped otherwise.

Prints one JSON object on stdout (images/s and ratios from this one run); progress goes to stderr.
Usage: .venv/bin/python benchmarks/bench_crawl.py [--quick] [-n N] [--threads 16] [--img2dataset-python PATH]
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import logging
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from synthetic import photo_like_image

from pipeline_lib.acquire import fingerprint
from pipeline_lib.acquire import ingest as ingest_lib
from pipeline_lib.acquire.crawl import crawl_sources
from pipeline_lib.core.catalog import write_snapshot
from pipeline_lib.core.config import (
    DedupConfig,
    ExecutionConfig,
    IngestConfig,
    ReviewConfig,
    SourcesConfig,
    UrlListSource,
)
from pipeline_lib.core.workspace import Workspace
from pipeline_lib.curate import review, review_pack
from pipeline_lib.curate.dedup import find_duplicates

log = logging.getLogger("bench_crawl")

WIDTH, HEIGHT, QUALITY = 2048, 1536, 90
HASHING = ("phash", 8)


# ---------------------------------------------------------------------------------------------------------------
# Data and the server


def make_images(folder: Path, n: int) -> list[Path]:
    """n distinct JPEGs: 16 generated pictures, each copy with its own noise patch (so every file is new)."""
    folder.mkdir(parents=True, exist_ok=True)
    bases = [np.asarray(photo_like_image(seed, WIDTH, HEIGHT, max_shape=600)) for seed in range(min(16, n))]
    paths = []
    for index in range(n):
        rng = np.random.default_rng(1000 + index)
        pixels = bases[index % len(bases)].copy()
        y, x = int(rng.integers(0, HEIGHT - 96)), int(rng.integers(0, WIDTH - 96))
        pixels[y : y + 96, x : x + 96] = rng.integers(0, 256, size=(96, 96, 3), dtype=np.uint8)
        path = folder / f"img{index:04d}.jpg"
        Image.fromarray(pixels).save(path, "JPEG", quality=QUALITY)
        paths.append(path)
    return paths


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as a real image host

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        pass


def serve_folder(folder: str, ports: Any) -> None:
    """Serve folder on a free loopback port until terminated (runs in its own process)."""
    handler = functools.partial(_QuietHandler, directory=folder)
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        server.daemon_threads = True
        ports.put(server.server_address[1])
        server.serve_forever()


def write_url_lists(root: Path, base: str, paths: list[Path]) -> tuple[Path, Path]:
    """The same URLs as aidetect's url,label,group CSV and as img2dataset's text list."""
    urls = [f"{base}/{path.name}" for path in paths]
    listing = root / "urls.csv"
    listing.write_text("url,label,group\n" + "".join(f"{url},real,g{i % 20}\n" for i, url in enumerate(urls)))
    text = root / "urls.txt"
    text.write_text("\n".join(urls) + "\n")
    return listing, text


# ---------------------------------------------------------------------------------------------------------------
# aidetect


def timed(function: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def crawl(root: Path, listing: Path, threads: int) -> tuple[Workspace, Any, float]:
    """aidetect's crawl stage into a fresh workspace: (workspace, result, seconds)."""
    workspace = Workspace.create(root)
    sources = SourcesConfig(
        urls=[UrlListSource(csv=listing, threads=threads)],
        allow_private_addresses=True,
        request_timeout_s=60,
        max_retries=1,
    )
    result, seconds = timed(crawl_sources, workspace, sources)
    return workspace, result, seconds


def ingest_stage(workspace: Workspace, crawl_log: Any, hashing: tuple[str, int] | None, threads: int) -> Any:
    """The ingest stage as the pipeline runs it: plan, chunks validated on threads, merge."""
    config = IngestConfig()
    jobs = ingest_lib.validation_jobs(workspace, ingest_lib.files_to_ingest(crawl_log), config)
    chunks = fingerprint.chunked(jobs, ExecutionConfig().chunk_size)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        results = list(pool.map(lambda chunk: ingest_lib.validate_files(workspace, chunk, config, hashing), chunks))
    rows = [row for chunk_rows in results for row in chunk_rows]
    checks, hashes = ingest_lib.checks_by_sha(rows), ingest_lib.hashes_by_sha(rows)
    return ingest_lib.ingest(workspace, crawl_log, config, checks=checks, hashing=hashing, hashes=hashes)


def fingerprint_stage(workspace: Workspace, catalog: Any, threads: int) -> tuple[Any, int]:
    """The fingerprint stage as the pipeline runs it: plan, chunks hashed on threads, merge; images hashed now."""
    jobs = fingerprint.missing_hash_jobs(workspace, catalog, *HASHING)
    chunks = fingerprint.chunked(jobs, ExecutionConfig().chunk_size)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        results = list(pool.map(lambda chunk: fingerprint.hash_jobs(workspace, chunk, *HASHING), chunks))
    rows = [row for chunk_rows in results for row in chunk_rows]
    hashed, stats = fingerprint.merge_hash_rows(workspace, catalog, rows, *HASHING)
    return hashed, stats["hashed"]


def review_auto(workspace: Workspace, catalog: Any) -> None:
    """What the review gate does in review.mode auto: apply the decisions, write the snapshot (no pack)."""
    outcome = review.apply_decisions(catalog, review.read_decisions(workspace), "auto")
    write_snapshot(workspace, "review", outcome.catalog)


def review_auto_with_pack(workspace: Workspace, catalog: Any) -> None:
    """Auto mode as it was: the same, plus the review pack nobody looks at (thumbnails now made at draft scale)."""
    outcome = review.apply_decisions(catalog, review.read_decisions(workspace), "auto")
    review_pack.write_review_pack(workspace, outcome.catalog, ReviewConfig().thumbnail_size)
    write_snapshot(workspace, "review", outcome.catalog)


def measure_aidetect(root: Path, listing: Path, n: int, threads: int) -> dict[str, Any]:
    """Crawl alone; crawl + one-decode ingest + fingerprint; the previous ingest + fingerprint on other copies."""
    cores = os.cpu_count() or 1
    old_ws, old_crawl, crawl_s = crawl(root / "previous", listing, threads)
    if int(old_crawl.summary["new"].sum()) != n:
        raise RuntimeError(f"the crawl fetched {old_crawl.summary['new'].sum()} of {n} images")
    log.info("crawl only: %.2f s", crawl_s)
    old_catalog, old_ingest_s = timed(ingest_stage, old_ws, old_crawl.log, None, cores)
    (old_hashed_catalog, old_hashed), old_fingerprint_s = timed(fingerprint_stage, old_ws, old_catalog, cores)
    old_deduped = find_duplicates(old_hashed_catalog, DedupConfig().threshold).catalog
    _, pack_s = timed(review_auto_with_pack, old_ws, old_deduped)
    log.info("previous: ingest %.2f s, fingerprint %.2f s (%d hashed)", old_ingest_s, old_fingerprint_s, old_hashed)
    new_ws, new_crawl, crawl2_s = crawl(root / "one-decode", listing, threads)
    new_catalog, new_ingest_s = timed(ingest_stage, new_ws, new_crawl.log, HASHING, cores)
    (new_hashed_catalog, new_hashed), new_fingerprint_s = timed(fingerprint_stage, new_ws, new_catalog, cores)
    _, review_s = timed(review_auto, new_ws, find_duplicates(new_hashed_catalog, DedupConfig().threshold).catalog)
    log.info("review stage, auto mode: %.2f s; with the pack as before: %.2f s", review_s, pack_s)
    log.info("one decode: crawl %.2f s, ingest %.2f s, fingerprint %.2f s", crawl2_s, new_ingest_s, new_fingerprint_s)
    ok = int((new_catalog["status"] == "ok").sum())
    return {
        "crawl_s": round(crawl_s, 3),
        "crawl_images_per_s": round(n / crawl_s, 1),
        "crawl_again_s": round(crawl2_s, 3),
        "crawl_plus_ingest_s": round(crawl2_s + new_ingest_s, 3),
        "crawl_plus_ingest_images_per_s": round(n / (crawl2_s + new_ingest_s), 1),
        "ingest_s": round(new_ingest_s, 3),
        "ingest_ok": ok,
        "fingerprint_after_ingest_s": round(new_fingerprint_s, 3),
        "fingerprint_after_ingest_hashed": new_hashed,
        "previous_ingest_s": round(old_ingest_s, 3),
        "previous_fingerprint_s": round(old_fingerprint_s, 3),
        "previous_fingerprint_hashed": old_hashed,
        "ingest_plus_fingerprint_vs_previous_ingest_alone": round((new_ingest_s + new_fingerprint_s) / old_ingest_s, 3),
        "review_auto_s": round(review_s, 3),
        "review_auto_if_it_built_the_pack_s": round(pack_s, 3),
        "ingest_plus_fingerprint_speedup_vs_previous": round(
            (old_ingest_s + old_fingerprint_s) / (new_ingest_s + new_fingerprint_s), 2
        ),
    }


# ---------------------------------------------------------------------------------------------------------------
# img2dataset

IMG2DATASET_PROBE = """
import json, sys, time
from img2dataset import download
kwargs = json.loads(sys.argv[1])
start = time.perf_counter()
download(**kwargs)
print(json.dumps({"download_s": time.perf_counter() - start}))
"""


def find_img2dataset(python: str | None) -> str | None:
    """An interpreter that can import img2dataset: the one given, else this one if it can; None if none."""
    candidates = [python] if python else [sys.executable]
    for candidate in candidates:
        probe = subprocess.run([candidate, "-c", "import img2dataset"], capture_output=True, env=_quiet_env())
        if probe.returncode == 0:
            return candidate
    return None


def _quiet_env() -> dict[str, str]:
    """No update checks or telemetry from img2dataset's dependencies (nothing leaves the machine)."""
    return os.environ | {"NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"}


def measure_img2dataset(python: str, root: Path, url_text: Path, n: int, threads: int) -> dict[str, Any]:
    """img2dataset download-only on the same URLs: its download() time and the whole command's wall time."""
    output = root / "img2dataset-out"
    kwargs = {
        "url_list": str(url_text),
        "input_format": "txt",
        "output_folder": str(output),
        "output_format": "files",
        "processes_count": 1,
        "thread_count": threads,
        "resize_mode": "no",
        "disable_all_reencoding": True,
        "timeout": 60,
        "retries": 1,
        "enable_wandb": False,
        "number_sample_per_shard": max(n, 1),
    }
    start = time.perf_counter()
    result = subprocess.run(
        [python, "-c", IMG2DATASET_PROBE, json.dumps(kwargs)], capture_output=True, text=True, env=_quiet_env()
    )
    command_s = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"img2dataset failed: {result.stderr[-2000:]}")
    download_s = json.loads(result.stdout.strip().splitlines()[-1])["download_s"]
    fetched = len(list(output.rglob("*.jpg")))
    if fetched != n:
        raise RuntimeError(f"img2dataset fetched {fetched} of {n} images")
    shard_s = sum(json.loads(path.read_text())["duration"] for path in output.glob("*_stats.json"))
    shutil.rmtree(output)
    return {
        "img2dataset_download_s": round(download_s, 3),
        "img2dataset_images_per_s": round(n / download_s, 1),
        "img2dataset_shard_s": round(shard_s, 3),  # its own figure: the shard's download inside its worker
        "img2dataset_shard_images_per_s": round(n / shard_s, 1),
        "img2dataset_command_s": round(command_s, 3),
        "img2dataset_python": python,
    }


# ---------------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8 images instead of 300: every path, in seconds")
    parser.add_argument("-n", type=int, default=None, help="number of images (default 300, --quick 8)")
    parser.add_argument("--threads", type=int, default=16, help="download threads, for both tools")
    parser.add_argument("--img2dataset-python", default=None, help="an interpreter with img2dataset installed")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    logging.getLogger("pipeline_lib").setLevel(logging.WARNING)
    n = args.n or (8 if args.quick else 300)
    img2dataset_python = find_img2dataset(args.img2dataset_python)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        log.info("generating %d %dx%d JPEGs ...", n, WIDTH, HEIGHT)
        paths = make_images(root / "site", n)
        context = multiprocessing.get_context("spawn")
        ports = context.Queue()
        server = context.Process(target=serve_folder, args=(str(root / "site"), ports), daemon=True)
        server.start()
        try:
            listing, url_text = write_url_lists(root, f"http://127.0.0.1:{ports.get(timeout=300)}", paths)
            figures = measure_aidetect(root, listing, n, args.threads)
            if img2dataset_python:
                figures |= measure_img2dataset(img2dataset_python, root, url_text, n, args.threads)
        finally:
            server.terminate()
            server.join(timeout=30)
        mean_bytes = int(np.mean([path.stat().st_size for path in paths]))
    summary: dict[str, Any] = {
        "benchmark": "crawl",
        "quick": args.quick,
        "n_images": n,
        "image_size": [WIDTH, HEIGHT],
        "jpeg_quality": QUALITY,
        "mean_file_bytes": mean_bytes,
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "load_average_at_end": round(os.getloadavg()[0], 2),
        **figures,
    }
    if img2dataset_python:  # against img2dataset's own figure (its start-up excluded, ours included): the strict one
        summary["crawl_vs_img2dataset_throughput"] = round(
            figures["crawl_images_per_s"] / figures["img2dataset_shard_images_per_s"], 2
        )
        summary["crawl_vs_img2dataset_download_call_throughput"] = round(
            figures["crawl_images_per_s"] / figures["img2dataset_images_per_s"], 2
        )
        summary["crawl_plus_ingest_vs_img2dataset_throughput"] = round(
            figures["crawl_plus_ingest_images_per_s"] / figures["img2dataset_shard_images_per_s"], 2
        )
    else:
        summary["img2dataset"] = "skipped: not installed (pip install img2dataset, or pass --img2dataset-python)"
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
