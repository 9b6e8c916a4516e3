"""Per-file jobs that may run in worker processes, and the process pool that runs them only where it pays.

Workers import this module, and through it only numpy, Pillow, scipy.fft and imagehash (`hashing`, `validate`,
`workspace`): no pandas, no Prefect. A spawned worker also re-imports the caller's `__main__` script, as every
spawn pool does; its imports add to the start-up.

The pool is started only when it saves time: the first SAMPLE_JOBS jobs run in this process and give the time per
job; the rest go to a pool only if (remaining jobs) x (time per job) x (1 - 1/parallelism) exceeds the start-up of
the workers, where parallelism counts the cores that are idle now (load average), not all of them.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

from PIL import Image

from pipeline_lib.acquire import hashing
from pipeline_lib.acquire.validate import AnimatedPolicy, ImageCheck, inspect_image
from pipeline_lib.core.workspace import file_sha256

log = logging.getLogger(__name__)

# CPU seconds one spawned worker needs before its first job (interpreter, this module's imports, multiprocessing
# bootstrap): on the idle 2-core development machine its imports took ~0.45 s (numpy 0.16, scipy.fft 0.34 with
# numpy, imagehash 0.10, Pillow 0.04; 2026-12-02). benchmarks/bench_hashing.py prints the measured value
# (`pool_startup_s_per_worker_cpu`) next to this one.
WORKER_STARTUP_S = 0.5
SAMPLE_JOBS = 8  # jobs run in this process first, to measure the time per job
SHA_MISMATCH = "sha_mismatch"

J = TypeVar("J")
R = TypeVar("R")


# ---------------------------------------------------------------------------------------------------------------
# Jobs


@dataclass(frozen=True)
class HashJob:
    """One image to hash (picklable)."""

    sha256: str
    path: str
    algorithm: str
    hash_size: int


@dataclass(frozen=True)
class HashOutcome:
    """Hashes of one sha256, or the error that prevented them (error is "" on success)."""

    sha256: str
    phash: str
    dhash: str
    error: str
    message: str = ""


def hash_job(job: HashJob) -> HashOutcome:
    """Hash one file; any failure is returned, not raised."""
    try:
        main, second = hashing.hash_pair(Path(job.path), job.algorithm, job.hash_size)
    except Exception as error:  # PIL and the hashers raise many types; each becomes a recorded reason
        return HashOutcome(job.sha256, "", "", type(error).__name__, str(error))
    return HashOutcome(job.sha256, main, second, "")


@dataclass(frozen=True)
class ValidateJob:
    """A crawled file to validate, and to hash in the same decode when algorithm is set (picklable)."""

    sha256: str
    source: str
    min_side: int
    max_pixels: int
    animated: str
    algorithm: str = ""  # "" = validate only
    hash_size: int = 0


@dataclass(frozen=True)
class Validated:
    """What validate_job found: the check, and (configured algorithm's hash, dhash) if the file was hashed."""

    sha256: str
    check: ImageCheck
    hashes: tuple[str, str] | None = None


def _hash_safely(image: Image.Image, check: ImageCheck, algorithm: str, hash_size: int) -> tuple[str, str] | None:
    """Hashes of a decoded image, or None (logged) if they cannot be computed: the fingerprint stage tries again."""
    try:
        return hashing.hash_decoded(image, (int(check.width or 0), int(check.height or 0)), algorithm, hash_size)
    except Exception as error:  # the file passed validation; a hashing failure is the fingerprint stage's to record
        log.warning("could not hash %s at ingest: %s: %s", image.filename, type(error).__name__, error)
        return None


def validate_job(job: ValidateJob) -> Validated:
    """Check that the file's bytes match its sha256 name, then validate it, hashing it from the same decode."""
    source = Path(job.source)
    if file_sha256(source) != job.sha256:
        n_bytes = source.stat().st_size
        return Validated(job.sha256, ImageCheck(False, SHA_MISMATCH, None, None, "", "", None, n_bytes, False))
    policy: AnimatedPolicy = job.animated  # type: ignore[assignment]
    if not job.algorithm:
        return Validated(job.sha256, inspect_image(source, job.min_side, job.max_pixels, policy)[0])
    hashing.check_params(job.algorithm, job.hash_size)
    check, hashes = inspect_image(
        source,
        job.min_side,
        job.max_pixels,
        policy,
        prepare=partial(hashing.prepare_decode, hash_size=job.hash_size),
        use=partial(_hash_safely, algorithm=job.algorithm, hash_size=job.hash_size),
    )
    return Validated(job.sha256, check, hashes)


# ---------------------------------------------------------------------------------------------------------------
# The pool


def idle_cores() -> float:
    """Cores this process may use that are not busy now: usable cores minus the load of the other processes."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average on this system: assume idle
        load = 0.0
    return min(float(usable), max(1.0, usable - max(0.0, load - 1.0)))  # the load includes this process


def pool_size(n_jobs: int, seconds_per_job: float, workers: int, cores: float, startup_s: float) -> int:
    """How many workers to start for n_jobs (1: none, run in this process).

    No more workers than idle cores (cores, fractional). The pool pays when the time it saves,
    n_jobs x seconds_per_job x (1 - 1/parallelism), exceeds its start-up: startup_s CPU seconds per worker, spread
    over the idle cores.
    """
    n_workers = max(1, min(workers, n_jobs, math.ceil(cores)))
    parallelism = min(float(n_workers), cores)
    if n_workers <= 1 or parallelism < 1.5:
        return 1
    saved = n_jobs * seconds_per_job * (1.0 - 1.0 / parallelism)
    startup = startup_s * n_workers / parallelism
    return n_workers if saved > startup else 1


def map_jobs(function: Callable[[J], R], jobs: Sequence[J], workers: int | None = None) -> Iterator[R]:
    """function over jobs, in order: first SAMPLE_JOBS here, the rest in a spawned pool if it pays (see pool_size).

    workers: the most worker processes (None: the CPU count; 1: never a pool). function must be a module-level
    function of a light module (this one), since spawned workers import it.
    """
    wanted = workers or os.cpu_count() or 1
    if wanted <= 1 or len(jobs) <= SAMPLE_JOBS:
        yield from map(function, jobs)
        return
    started = time.perf_counter()
    for job in jobs[:SAMPLE_JOBS]:
        yield function(job)
    per_job = (time.perf_counter() - started) / SAMPLE_JOBS
    rest = jobs[SAMPLE_JOBS:]
    n_workers = pool_size(len(rest), per_job, wanted, idle_cores(), WORKER_STARTUP_S)
    log.debug("%d jobs left at %.1f ms each: %d process(es)", len(rest), per_job * 1e3, n_workers)
    if n_workers <= 1:
        yield from map(function, rest)
        return
    yield from run_in_pool(function, rest, n_workers)


def run_in_pool(function: Callable[[J], R], jobs: Sequence[J], n_workers: int) -> Iterator[R]:
    """function over jobs in a spawned pool of n_workers (safe beside threads), in order, streamed."""
    chunksize = max(1, min(256, math.ceil(len(jobs) / (4 * n_workers))))
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=n_workers, mp_context=context) as pool:
        yield from pool.map(function, jobs, chunksize=chunksize)
