"""Per-image stages as mapped Prefect tasks: plan chunks of work, map them on the flow's task runner, merge.

Mapped tasks take and return small values (paths relative to the workspace, hex hashes), so they run the same
on threads, processes or Dask workers that see the workspace's filesystem.
"""

from __future__ import annotations

import logging

from prefect import task

from pipeline_lib import catalog as cat
from pipeline_lib import fingerprint as fingerprint_lib
from pipeline_lib.workspace import Ref, Workspace
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
    hash_version: int = fingerprint_lib.HASH_VERSION,
) -> list[Chunk]:
    """Chunks of the ok images whose hashes are not cached yet (hash_version keys the cache to the definition)."""
    workspace = Workspace.create(root)
    jobs = fingerprint_lib.missing_hash_jobs(workspace, cat.read_snapshot(workspace, catalog_ref), algorithm, hash_size)
    chunks = fingerprint_lib.chunked(jobs, chunk_size)
    log.info("fingerprint: %d images to hash in %d chunks of <= %d", len(jobs), len(chunks), chunk_size)
    return chunks


@task(name="fingerprint-hash-chunk")
def hash_chunk(
    root: str, chunk: Chunk, algorithm: str, hash_size: int, hash_version: int = fingerprint_lib.HASH_VERSION
) -> list[fingerprint_lib.HashRow]:
    """(sha256, hash, dhash, error) per image of one chunk; unreadable images give their error, never raise."""
    return fingerprint_lib.hash_jobs(Workspace.create(root), chunk, algorithm, hash_size)


@task(name="fingerprint-merge")
def merge_fingerprints(
    root: str,
    catalog_ref: Ref,
    algorithm: str,
    hash_size: int,
    results: list[list[fingerprint_lib.HashRow]],
    hash_version: int = fingerprint_lib.HASH_VERSION,
) -> StageResult:
    """Add the chunks' hashes to the hash cache and write the fingerprinted catalog snapshot."""
    workspace = Workspace.create(root)
    table = cat.read_snapshot(workspace, catalog_ref)
    rows = [tuple(row) for chunk_rows in results for row in chunk_rows]
    hashed, stats = fingerprint_lib.merge_hash_rows(workspace, table, rows, algorithm, hash_size)
    metrics = {f"fingerprint.{key}": float(value) for key, value in stats.items()}
    return StageResult(cat.write_snapshot(workspace, "fingerprint", hashed), metrics)
