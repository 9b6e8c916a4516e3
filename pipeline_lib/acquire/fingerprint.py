"""Perceptual fingerprints of ok images, computed once per sha256 and cached in the workspace.

The catalog's `phash` column holds the hash of the *configured* algorithm (phash, dhash, whash or ahash); the
column name is kept for schema stability. The `dhash` column always holds a dhash of the same size, a cheap
second opinion. Pixels are hashed as stored (EXIF orientation is not applied), so a file always hashes the same.

The hash itself (draft decoding, exact float phash/dhash) is defined in `pipeline_lib.acquire.hashing`; ingest
normally computes it already, from the decode that validates a file (`jobs`), so this stage only fills gaps (files
ingested before, another algorithm or hash size, a removed cache). Hashes made by other code are never mixed: the
cache file name carries the digest of the code that computes them (hash_code), so a change of that code recomputes
every hash on the next run.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pipeline_lib.acquire.hashing import check_params
from pipeline_lib.acquire.hashing import hash_image as hash_image  # the hash itself, re-exported for existing callers
from pipeline_lib.acquire.hashing import hash_pair as hash_pair
from pipeline_lib.acquire.jobs import HashJob, HashOutcome, hash_job, map_jobs, validate_job
from pipeline_lib.core.catalog import INVALID_PREFIX, STATUS_OK, conform
from pipeline_lib.core.code_index import producer_code
from pipeline_lib.core.progress import progress
from pipeline_lib.core.workspace import Workspace, atomic_path

log = logging.getLogger(__name__)

CACHE_COLUMNS: tuple[str, ...] = ("sha256", "phash", "dhash")
UNHASHABLE = "unhashable"
# The jobs whose hashes the cache holds: the fingerprint stage's, and ingest's (validate and hash in one decode).
HASH_PRODUCERS = (hash_job, validate_job)


def _run_jobs(jobs: list[HashJob], workers: int | None) -> Iterator[HashOutcome]:
    """Hash in this process, or streamed through a process pool where it pays (jobs.map_jobs)."""
    return map_jobs(hash_job, jobs, workers)


def hash_code() -> str:
    """The digest of the code that computes the cached hashes (HASH_PRODUCERS and what they reach); cheap to ask."""
    return producer_code(*HASH_PRODUCERS)


def cache_path(workspace: Workspace, algorithm: str, hash_size: int) -> Path:
    """Where the sha256 -> hashes table of one (algorithm, hash_size), made by the current code, is kept."""
    return workspace.cache / "hashes" / f"{algorithm}-{hash_size}-{hash_code()}.parquet"


def _empty_cache() -> pd.DataFrame:
    return pd.DataFrame({name: pd.Series([], dtype="string") for name in CACHE_COLUMNS})


def read_cache(path: Path) -> pd.DataFrame:
    """The cached hashes at path (empty if absent; an unreadable cache is logged and rebuilt)."""
    if not path.is_file():
        return _empty_cache()
    try:
        table = pd.read_parquet(path, engine="pyarrow")
    except (OSError, ValueError) as error:
        log.warning("hash cache %s is unreadable (%s); hashing again", path, error)
        return _empty_cache()
    missing = [name for name in CACHE_COLUMNS if name not in table.columns]
    if missing:
        log.warning("hash cache %s lacks columns %s; hashing again", path, missing)
        return _empty_cache()
    return table[list(CACHE_COLUMNS)].astype("string").drop_duplicates("sha256", keep="last")


def _write_cache(path: Path, table: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        table.sort_values("sha256").reset_index(drop=True).to_parquet(tmp, index=False, engine="pyarrow")


def store_hashes(workspace: Workspace, hashes: Mapping[str, tuple[str, str]], algorithm: str, hash_size: int) -> int:
    """Add sha256 -> (hash, dhash) computed elsewhere (at ingest) to the cache, atomically; return how many were new."""
    check_params(algorithm, hash_size)
    path = cache_path(workspace, algorithm, hash_size)
    cache = read_cache(path)
    known = set(cache["sha256"])
    fresh = [(sha, main, second) for sha, (main, second) in hashes.items() if sha not in known]
    if fresh:
        new = pd.DataFrame(fresh, columns=list(CACHE_COLUMNS)).astype("string")
        _write_cache(path, pd.concat([cache, new], ignore_index=True))
    return len(fresh)


@dataclass(frozen=True)
class FingerprintResult:
    """The hashed catalog and how many images were hashed now, taken from the cache, or found unhashable."""

    catalog: pd.DataFrame
    n_hashed: int
    n_cached: int
    n_unhashable: int


def _jobs_for(
    workspace: Workspace, ok: pd.DataFrame, known: Iterable[str], algorithm: str, hash_size: int
) -> list[HashJob]:
    """One job per distinct sha256 of ok rows that is not in the cache (its first row's path)."""
    known_set = set(known)
    firsts = ok.drop_duplicates("sha256")
    return [
        HashJob(sha, str(workspace.root / path), algorithm, hash_size)
        for sha, path in zip(firsts["sha256"], firsts["path"], strict=True)
        if sha not in known_set
    ]


def _collect(outcomes: Iterable[HashOutcome]) -> tuple[list[HashOutcome], dict[str, str]]:
    """Split outcomes into successes and sha256 -> error class name."""
    hashed: list[HashOutcome] = []
    failed: dict[str, str] = {}
    for outcome in outcomes:
        if outcome.error:
            log.warning("cannot hash %s: %s: %s", outcome.sha256[:12], outcome.error, outcome.message)
            failed[outcome.sha256] = outcome.error
        else:
            hashed.append(outcome)
    return hashed, failed


def _fill(catalog: pd.DataFrame, cache: pd.DataFrame, failed: dict[str, str]) -> pd.DataFrame:
    """Put hashes on ok rows and mark rows of unhashable images invalid:unhashable:<Error>."""
    out = catalog.copy()
    ok = out["status"] == STATUS_OK
    by_sha = cache.set_index("sha256")
    known = ok & out["sha256"].isin(by_sha.index)
    out.loc[known, "phash"] = by_sha["phash"].reindex(out.loc[known, "sha256"]).to_numpy()
    out.loc[known, "dhash"] = by_sha["dhash"].reindex(out.loc[known, "sha256"]).to_numpy()
    broken = ok & out["sha256"].isin(list(failed))
    out.loc[broken, "status"] = [f"{INVALID_PREFIX}{UNHASHABLE}:{failed[sha]}" for sha in out.loc[broken, "sha256"]]
    return conform(out)


def fingerprint_catalog_with_stats(
    workspace: Workspace, catalog: pd.DataFrame, algorithm: str, hash_size: int, workers: int | None = None
) -> FingerprintResult:
    """Hash each distinct sha256 of ok rows not hashed before (cached per algorithm and size); fill phash/dhash."""
    check_params(algorithm, hash_size)
    table = conform(catalog)
    path = cache_path(workspace, algorithm, hash_size)
    cache = read_cache(path)
    ok = table[table["status"] == STATUS_OK]
    jobs = _jobs_for(workspace, ok, cache["sha256"], algorithm, hash_size)
    hashed, failed = _collect(_run_jobs(jobs, workers))
    if hashed:
        new = pd.DataFrame([(o.sha256, o.phash, o.dhash) for o in hashed], columns=list(CACHE_COLUMNS))
        cache = pd.concat([cache, new.astype("string")], ignore_index=True)
        _write_cache(path, cache)
    n_cached = ok["sha256"].nunique() - len(jobs)
    log.info(
        "fingerprint %s-%d: %d hashed, %d cached, %d unhashable",
        algorithm,
        hash_size,
        len(hashed),
        n_cached,
        len(failed),
    )
    return FingerprintResult(_fill(table, cache, failed), len(hashed), n_cached, len(failed))


HashJobs = list[tuple[str, str]]  # (sha256, path relative to the workspace root)
HashRow = tuple[str, str, str, str]  # (sha256, hash of the configured algorithm, dhash, error class or "")


def missing_hash_jobs(workspace: Workspace, catalog: pd.DataFrame, algorithm: str, hash_size: int) -> HashJobs:
    """(sha256, relative path) of each distinct ok image whose hashes are not in the cache yet."""
    check_params(algorithm, hash_size)
    table = conform(catalog)
    ok = table[table["status"] == STATUS_OK]
    known = set(read_cache(cache_path(workspace, algorithm, hash_size))["sha256"])
    firsts = ok.drop_duplicates("sha256")
    return [
        (str(sha), str(path)) for sha, path in zip(firsts["sha256"], firsts["path"], strict=True) if sha not in known
    ]


def chunked(jobs: HashJobs, size: int) -> list[tuple[tuple[str, str], ...]]:
    """Jobs cut into tuples of at most size items (the unit of one mapped task)."""
    if size < 1:
        raise ValueError(f"chunk size must be >= 1, got {size}")
    return [tuple(jobs[start : start + size]) for start in range(0, len(jobs), size)]


def hash_jobs(workspace: Workspace, jobs: Iterable[tuple[str, str]], algorithm: str, hash_size: int) -> list[HashRow]:
    """Hash each (sha256, relative path) in turn; a file that cannot be hashed gives a row with its error class."""
    check_params(algorithm, hash_size)
    rows: list[HashRow] = []
    jobs = list(jobs)
    for sha, path in progress(jobs, len(jobs), "hashing"):
        outcome = hash_job(HashJob(sha, str(workspace.root / path), algorithm, hash_size))
        if outcome.error:
            log.warning("cannot hash %s: %s: %s", sha[:12], outcome.error, outcome.message)
        rows.append((outcome.sha256, outcome.phash, outcome.dhash, outcome.error))
    return rows


def merge_hash_rows(
    workspace: Workspace, catalog: pd.DataFrame, rows: Iterable[HashRow], algorithm: str, hash_size: int
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Add hashed rows to the cache (atomically) and fill the catalog; images still missing are hashed here.

    Returns the filled catalog and counts {"hashed", "cached", "unhashable"} of distinct ok images.
    """
    check_params(algorithm, hash_size)
    table = conform(catalog)
    outcomes = [HashOutcome(sha, main, second, error) for sha, main, second, error in rows]
    path = cache_path(workspace, algorithm, hash_size)
    cache = read_cache(path)
    given = {outcome.sha256 for outcome in outcomes}
    late = [job for job in missing_hash_jobs(workspace, table, algorithm, hash_size) if job[0] not in given]
    if late:  # e.g. the hash cache was removed after the plan was made: never leave an ok image unhashed
        log.warning("fingerprint: %d images missing from the plan are hashed now", len(late))
        outcomes += [HashOutcome(*row) for row in hash_jobs(workspace, late, algorithm, hash_size)]
    hashed, failed = _collect_quiet(outcomes)
    known = set(cache["sha256"])
    fresh = [o for o in hashed if o.sha256 not in known]
    if fresh:
        new = pd.DataFrame([(o.sha256, o.phash, o.dhash) for o in fresh], columns=list(CACHE_COLUMNS))
        cache = pd.concat([cache, new.astype("string")], ignore_index=True)
        _write_cache(path, cache)
    n_ok = int(table.loc[table["status"] == STATUS_OK, "sha256"].nunique())
    stats = {"hashed": len(fresh), "cached": n_ok - len(fresh) - len(failed), "unhashable": len(failed)}
    log.info("fingerprint %s-%d: %s", algorithm, hash_size, stats)
    return _fill(table, cache, failed), stats


def _collect_quiet(outcomes: Iterable[HashOutcome]) -> tuple[list[HashOutcome], dict[str, str]]:
    """Like _collect, without logging again (hash_jobs logged each failure where it happened)."""
    hashed = [o for o in outcomes if not o.error]
    failed = {o.sha256: o.error for o in outcomes if o.error}
    return hashed, failed


def fingerprint_catalog(
    workspace: Workspace, catalog: pd.DataFrame, algorithm: str, hash_size: int, workers: int | None = None
) -> pd.DataFrame:
    """The catalog with phash (configured algorithm) and dhash filled for ok rows (see ..._with_stats)."""
    return fingerprint_catalog_with_stats(workspace, catalog, algorithm, hash_size, workers).catalog
