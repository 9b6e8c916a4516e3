"""Per-image stages as mapped Prefect tasks: plan chunks of work, map them on the flow's task runner, merge.

Mapped tasks take and return small values (paths relative to the workspace, hex hashes), so they run the same
on threads, processes or Dask workers that see the workspace's filesystem.
"""

from __future__ import annotations

import logging
from typing import Any

from prefect import task

from pipeline_lib.acquire import fingerprint as fingerprint_lib
from pipeline_lib.acquire import ingest as ingest_lib
from pipeline_lib.core import catalog as cat
from pipeline_lib.core.config import IngestConfig, NormalizeConfig
from pipeline_lib.core.workspace import Ref, Workspace
from pipeline_lib.learn import preprocess as preprocess_lib
from tasks.stages import StageResult

log = logging.getLogger(__name__)

Chunk = tuple[tuple[str, str], ...]  # (sha256, path relative to the workspace root) pairs


@task(name="fingerprint-plan")
def plan_fingerprint(
    root: str,
    catalog_ref: Ref,
    algorithm: str,
    hash_size: int,
    chunk_size: int = 256,
) -> list[Chunk]:
    """Chunks of the ok images whose hashes are not cached yet (the cache is named by the hashing code's digest)."""
    workspace = Workspace.create(root)
    jobs = fingerprint_lib.missing_hash_jobs(workspace, cat.read_snapshot(workspace, catalog_ref), algorithm, hash_size)
    chunks = fingerprint_lib.chunked(jobs, chunk_size)
    log.info("fingerprint: %d images to hash in %d chunks of <= %d", len(jobs), len(chunks), chunk_size)
    return chunks


@task(name="fingerprint-hash-chunk")
def hash_chunk(root: str, chunk: Chunk, algorithm: str, hash_size: int) -> list[fingerprint_lib.HashRow]:
    """(sha256, hash, dhash, error) per image of one chunk; unreadable images give their error, never raise."""
    return fingerprint_lib.hash_jobs(Workspace.create(root), chunk, algorithm, hash_size)


@task(name="fingerprint-merge")
def merge_fingerprints(
    root: str,
    catalog_ref: Ref,
    algorithm: str,
    hash_size: int,
    results: list[list[fingerprint_lib.HashRow]],
) -> StageResult:
    """Add the chunks' hashes to the hash cache and write the fingerprinted catalog snapshot."""
    workspace = Workspace.create(root)
    table = cat.read_snapshot(workspace, catalog_ref)
    rows = [tuple(row) for chunk_rows in results for row in chunk_rows]
    hashed, stats = fingerprint_lib.merge_hash_rows(workspace, table, rows, algorithm, hash_size)
    metrics = {f"fingerprint.{key}": float(value) for key, value in stats.items()}
    return StageResult(cat.write_snapshot(workspace, "fingerprint", hashed), metrics)


def _active(policy: NormalizeConfig | None) -> NormalizeConfig | None:
    """The normalisation policy when it re-encodes, else None (the plain tensor cache)."""
    return policy if policy is not None and policy.mode != "none" else None


@task(name="preprocess-plan")
def plan_preprocess(
    root: str, catalog_ref: Ref, size: int, policy: NormalizeConfig | None = None, chunk_size: int = 256
) -> list[Chunk]:
    """Chunks of the split images whose tensors are not cached yet."""
    workspace = Workspace.create(root)
    table = cat.read_snapshot(workspace, catalog_ref)
    jobs = preprocess_lib.missing_tensor_jobs(workspace, table, size, _active(policy))
    chunks = fingerprint_lib.chunked(jobs, chunk_size)
    log.info("preprocess: %d images to decode in %d chunks of <= %d", len(jobs), len(chunks), chunk_size)
    return chunks


@task(name="preprocess-tensor-chunk")
def tensor_chunk(root: str, chunk: Chunk, size: int, policy: NormalizeConfig | None = None) -> tuple[int, list[str]]:
    """Decode one chunk into the tensor cache (atomic writes): (new tensors, per-image errors); never raises for one."""
    return preprocess_lib.write_tensors(Workspace.create(root), chunk, size, _active(policy))


@task(name="preprocess-merge")
def merge_preprocess(
    root: str,
    catalog_ref: Ref,
    size: int,
    policy: NormalizeConfig | None,
    results: list[tuple[int, list[str]]],
) -> StageResult:
    """Sum the chunks' new tensors (PreprocessError naming any image that failed); the catalog passes through."""
    workspace = Workspace.create(root)
    active = _active(policy)
    table = cat.read_snapshot(workspace, catalog_ref)
    written = preprocess_lib.merge_tensor_results(workspace, table, size, active, results)
    notes = [f"tensors: cache/tensors/{preprocess_lib.cache_folder_name(size, active)}"]
    return StageResult(catalog_ref, {"preprocess.new_tensors": float(written)}, notes)


@task(name="ingest-plan")
def plan_ingest(
    root: str, crawl_log: Ref, config: IngestConfig, hashing: ingest_lib.Hashing | None = None, chunk_size: int = 256
) -> list[Chunk]:
    """Chunks of the crawled files that need validating (no reusable validation record under this ingest policy)."""
    workspace = Workspace.create(root)
    files = ingest_lib.files_to_ingest(cat.read_table(workspace, crawl_log))
    jobs = ingest_lib.validation_jobs(workspace, files, config)
    chunks = fingerprint_lib.chunked(jobs, chunk_size)
    log.info("ingest: %d of %d files to validate in %d chunks of <= %d", len(jobs), len(files), len(chunks), chunk_size)
    return chunks


@task(name="ingest-validate-chunk")
def validate_chunk(
    root: str,
    chunk: Chunk,
    config: IngestConfig,
    hashing: ingest_lib.Hashing | None = None,
) -> list[dict[str, Any]]:
    """ImageCheck dicts (with sha256, and the hashes of `hashing` from the same decode) of one chunk's files."""
    return ingest_lib.validate_files(Workspace.create(root), chunk, config, hashing)


@task(name="ingest-merge")
def merge_ingest(
    root: str,
    crawl_log: Ref,
    config: IngestConfig,
    hashing: ingest_lib.Hashing | None,
    results: list[list[dict[str, Any]]],
) -> StageResult:
    """Place the files (store/ or quarantine/, validation records), put their hashes into the fingerprint cache,
    and snapshot the catalog."""
    workspace = Workspace.create(root)
    rows = [row for chunk_rows in results for row in chunk_rows]
    checks, hashes = ingest_lib.checks_by_sha(rows), ingest_lib.hashes_by_sha(rows)
    crawled = cat.read_table(workspace, crawl_log)
    table = ingest_lib.ingest(workspace, crawled, config, checks=checks, hashing=hashing, hashes=hashes)
    summary = ingest_lib.ingest_summary(table)
    metrics = {f"ingest.{k}": float(v) for k, v in summary.items()}
    return StageResult(cat.write_snapshot(workspace, "ingest", table), metrics, ingest_lib.missing_notes(table))
