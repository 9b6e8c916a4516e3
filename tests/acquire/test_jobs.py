"""Per-file jobs: validation that hashes from the same decode, the pool's break-even, light worker imports."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline_lib.acquire import jobs
from pipeline_lib.acquire.hashing import hash_pair
from pipeline_lib.acquire.validate import check_image
from pipeline_lib.core.workspace import bytes_sha256

MIN_SIDE, MAX_PIXELS = 16, 10_000_000


def _jpeg(seed: int, progressive: bool, subsampling: int) -> bytes:
    rng = np.random.default_rng(seed)
    field = Image.fromarray(rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)).resize((320, 240))
    pixels = np.asarray(field, dtype=np.int16) + rng.normal(0, 8, size=(240, 320, 3)).astype(np.int16)
    buffer = io.BytesIO()
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    image.save(buffer, "JPEG", quality=90, progressive=progressive, subsampling=subsampling)
    return buffer.getvalue()


def _damaged(data: bytes, rng: np.random.Generator, kind: int) -> bytes:
    """Cut short, bytes overwritten in the compressed stream, or a run of it zeroed."""
    damaged = bytearray(data)
    if kind == 0:
        return bytes(damaged[: int(rng.integers(200, len(damaged)))])
    if kind == 1:
        for _ in range(int(rng.integers(1, 20))):
            damaged[int(rng.integers(600, len(damaged) - 2))] = int(rng.integers(0, 256))
        return bytes(damaged)
    start = int(rng.integers(600, len(damaged) - 200))
    length = int(rng.integers(1, 200))
    damaged[start : start + length] = bytes(length)
    return bytes(damaged)


def test_validating_with_hashing_finds_what_a_full_decode_finds_in_damaged_jpegs(tmp_path: Path) -> None:
    """With hashing, a JPEG is decoded to luma at 1/8 scale: every compressed byte is still read, so the verdict on
    damaged files is that of a full-size RGB decode; and the hashes are those of the fingerprint stage."""
    rng = np.random.default_rng(0)
    verdicts = []
    for progressive in (False, True):
        for subsampling in (0, 2):
            original = _jpeg(int(rng.integers(1000)), progressive, subsampling)
            for index in range(24):
                data = original if index == 0 else _damaged(original, rng, index % 3)
                sha = bytes_sha256(data)
                path = tmp_path / f"{sha}.jpg"
                path.write_bytes(data)
                full = check_image(path, MIN_SIDE, MAX_PIXELS, "first_frame")
                job = jobs.ValidateJob(sha, str(path), MIN_SIDE, MAX_PIXELS, "first_frame", "phash", 8)
                done = jobs.validate_job(job)
                assert (done.check.ok, done.check.reason) == (full.ok, full.reason), (progressive, index)
                assert done.check == full, "size, mode and orientation come from the header, as before"
                assert done.hashes == (hash_pair(path) if full.ok else None)
                verdicts.append(full.ok)
    assert 20 < sum(verdicts) < len(verdicts) - 20, "the corpus must hold both readable and damaged files"


def test_a_file_whose_bytes_do_not_match_its_name_is_not_decoded(tmp_path: Path) -> None:
    path = tmp_path / "x.jpg"
    path.write_bytes(_jpeg(1, False, 2))
    done = jobs.validate_job(jobs.ValidateJob("0" * 64, str(path), MIN_SIDE, MAX_PIXELS, "first_frame", "phash", 8))
    assert (done.check.ok, done.check.reason, done.hashes) == (False, jobs.SHA_MISMATCH, None)


@pytest.mark.parametrize(
    ("n_jobs", "seconds_per_job", "workers", "cores", "expected"),
    [
        (1000, 0.01, 2, 2.0, 2),  # saves 5 s for 0.5 s of start-up
        (99, 0.01, 2, 2.0, 1),  # saves 0.495 s: less than the start-up
        (101, 0.01, 2, 2.0, 2),  # saves 0.505 s: just more
        (1000, 0.01, 2, 1.0, 1),  # the other core is busy: nothing to gain
        (1000, 0.01, 8, 2.0, 2),  # no more workers than idle cores
        (1000, 0.01, 8, 3.5, 4),  # 4 workers on 3.5 idle cores: saves 7.1 s for 0.57 s of start-up
        (1000, 0.0005, 8, 3.5, 1),  # saves 0.36 s: less than the start-up
        (1, 1.0, 4, 4.0, 1),  # one job
    ],
)
def test_the_pool_starts_only_where_it_pays(
    n_jobs: int, seconds_per_job: float, workers: int, cores: float, expected: int
) -> None:
    assert jobs.pool_size(n_jobs, seconds_per_job, workers, cores, startup_s=0.5) == expected


def test_idle_cores_are_between_one_and_the_usable_cores() -> None:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert 1.0 <= jobs.idle_cores() <= usable


def test_map_jobs_keeps_the_order_in_a_forced_pool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobs, "WORKER_STARTUP_S", 0.0)
    monkeypatch.setattr(jobs, "idle_cores", lambda: 2.0)
    paths = []
    for seed in range(jobs.SAMPLE_JOBS + 6):
        path = tmp_path / f"{seed}.jpg"
        path.write_bytes(_jpeg(seed, False, 2))
        paths.append(path)
    work = [jobs.HashJob(str(i), str(path), "phash", 8) for i, path in enumerate(paths)]
    pooled = list(jobs.map_jobs(jobs.hash_job, work, workers=2))
    assert [outcome.sha256 for outcome in pooled] == [job.sha256 for job in work]
    assert [(o.phash, o.dhash) for o in pooled] == [hash_pair(path) for path in paths]


def test_a_worker_imports_only_what_hashing_needs() -> None:
    code = (
        "import sys, pipeline_lib.acquire.jobs\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'pandas', 'pyarrow', 'prefect', 'torch', 'mlflow'})\n"
        "print(','.join(heavy))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert result.stdout.strip() == "", f"a worker would import {result.stdout.strip()}"
