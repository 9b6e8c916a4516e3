"""Ingest: validate crawled files once, move them into the store (or quarantine), build the catalog.

Given the dedup hash settings (`hashing`), the one decode that validates a new file also computes its perceptual
hashes, which go to the fingerprint cache: the fingerprint stage then only fills gaps.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline_lib.acquire.fingerprint import store_hashes
from pipeline_lib.acquire.jobs import SHA_MISMATCH, Validated, ValidateJob, map_jobs, validate_job
from pipeline_lib.acquire.validate import ImageCheck
from pipeline_lib.core.catalog import INVALID_PREFIX, STATUS_OK, empty_catalog, is_invalid, new_rows
from pipeline_lib.core.code_index import producer_code
from pipeline_lib.core.config import IngestConfig
from pipeline_lib.core.progress import progress
from pipeline_lib.core.workspace import Workspace, atomic_write_bytes, file_sha256, sync_files

log = logging.getLogger(__name__)

LOG_COLUMNS: tuple[str, ...] = (
    "sha256",
    "ext",
    "url",
    "source",
    "keyword",
    "label",
    "group",
    "generator",
    "fetched_at",
)
MISSING_FILE = "missing_file"
HASH_COLUMNS: tuple[str, ...] = ("phash", "dhash")  # validate_files' hashes ("" when not hashed)
Hashing = tuple[str, int]  # (algorithm, hash_size) of the dedup config
VALIDATION_PRODUCERS = (validate_job,)  # what makes a validation record: its digest names the records' folder
Hashes = Mapping[str, tuple[str, str]]  # sha256 -> (hash of the configured algorithm, dhash)


@dataclass(frozen=True)
class Placement:
    """Where one sha256's file lives after ingest (path relative to the workspace; "" if missing) and its check."""

    path: str
    check: ImageCheck


def policy_folder(config: IngestConfig) -> str:
    """The name of one ingest policy's records made by the current code: min_side, max_pixels and animated decide
    whether a file is usable, and the digest of VALIDATION_PRODUCERS (and what they reach) names the code."""
    return f"min{config.min_side}-px{config.max_pixels}-{config.animated}-{producer_code(*VALIDATION_PRODUCERS)}"


def records_folder(workspace: Workspace, config: IngestConfig) -> Path:
    """The validation records of one ingest policy made by the current code (another policy, or another version
    of the validation code, judges every file again)."""
    return workspace.cache / "validation" / policy_folder(config)


def validation_record_path(workspace: Workspace, sha256: str, config: IngestConfig) -> Path:
    """Where the validation record of one sha256 under one ingest policy is kept (see records_folder)."""
    return records_folder(workspace, config) / f"{sha256}.json"


def _quarantine_path(workspace: Workspace, sha256: str, ext: str) -> Path:
    return workspace.quarantine / f"{sha256}.{ext}"


def _read_record(path: Path) -> ImageCheck | None:
    """A stored validation record, or None when absent or unreadable (then the file is validated again)."""
    if not path.is_file():
        return None
    try:
        return ImageCheck(**json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, TypeError) as error:
        log.warning("validation record %s is unreadable (%s); validating the file again", path, error)
        return None


def recorded_check(workspace: Workspace, sha256: str, config: IngestConfig | None = None) -> ImageCheck | None:
    """What ingest found when it validated sha256 under config's policy (its validation record), or None if it
    never did; without config, the latest record under any policy."""
    if config is not None:
        return _read_record(validation_record_path(workspace, sha256, config))
    records = list((workspace.cache / "validation").glob(f"*/{sha256}.json"))
    for path in sorted(records, key=lambda p: p.stat().st_mtime, reverse=True):
        check = _read_record(path)
        if check is not None:
            return check
    return None


def _write_record(workspace: Workspace, sha256: str, check: ImageCheck, config: IngestConfig) -> None:
    """Write the record atomically; place_files makes its batch of records durable at once (sync_files)."""
    text = json.dumps(dataclasses.asdict(check), sort_keys=True)
    atomic_write_bytes(validation_record_path(workspace, sha256, config), text.encode("utf-8"), durable=False)


def _stored_copies(workspace: Workspace, sha256: str, ext: str) -> list[Path]:
    """Existing copies of sha256 in store/ or quarantine/, the log's extension first."""
    preferred = [workspace.store_path(sha256, ext), _quarantine_path(workspace, sha256, ext)]
    others = [*workspace.store.glob(f"{sha256[:2]}/{sha256}.*"), *workspace.quarantine.glob(f"{sha256}.*")]
    return [p for p in preferred if p.is_file()] + sorted(p for p in others if p not in preferred)


def _target(workspace: Workspace, sha256: str, ext: str, check: ImageCheck) -> Path:
    return workspace.store_path(sha256, ext) if check.ok else _quarantine_path(workspace, sha256, ext)


def _reusable(workspace: Workspace, sha256: str, ext: str, config: IngestConfig) -> Placement | None:
    """The earlier placement of sha256 under this policy if its record and its file (where it says) still exist."""
    check = _read_record(validation_record_path(workspace, sha256, config))
    if check is None:
        return None
    for copy in _stored_copies(workspace, sha256, ext):
        if copy == _target(workspace, sha256, copy.suffix[1:], check):
            return Placement(workspace.relative(copy), check)
    return None


def _job(sha256: str, source: Path, config: IngestConfig, hashing: Hashing | None) -> ValidateJob:
    algorithm, hash_size = hashing or ("", 0)
    return ValidateJob(sha256, str(source), config.min_side, config.max_pixels, config.animated, algorithm, hash_size)


def _validate_jobs(jobs: list[ValidateJob], workers: int | None) -> dict[str, Validated]:
    """Validate (and hash) files in this process, or in a process pool where it pays (jobs.map_jobs)."""
    return {done.sha256: done for done in map_jobs(validate_job, jobs, workers)}


def _place(workspace: Workspace, sha256: str, source: Path, check: ImageCheck, config: IngestConfig) -> Placement:
    """Move a validated file (same filesystem, byte-identical) to store/ or quarantine/, then record its check."""
    target = _target(workspace, sha256, source.suffix[1:], check)
    if source != target:
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)
    _write_record(workspace, sha256, check, config)
    return Placement(workspace.relative(target), check)


def _drop_redundant_incoming(incoming: Path, sha256: str) -> None:
    """Remove a re-downloaded copy of bytes already ingested (only if its content really is sha256)."""
    if not incoming.is_file():
        return
    if file_sha256(incoming) == sha256:
        incoming.unlink()
        log.debug("removed redundant incoming copy %s", incoming.name)
    else:
        log.warning("incoming file %s does not match its name; left in place for inspection", incoming)


def _unique_files(crawl_log: pd.DataFrame) -> dict[str, str]:
    """sha256 -> ext of its first successful log row, in log order."""
    files: dict[str, str] = {}
    for sha256, ext in zip(crawl_log["sha256"], crawl_log["ext"], strict=True):
        files.setdefault(str(sha256), str(ext).lstrip("."))
    return files


def _source(workspace: Workspace, sha256: str, ext: str) -> Path:
    """The file to validate for sha256: an existing stored/quarantined copy, else the incoming download."""
    return next(iter(_stored_copies(workspace, sha256, ext)), workspace.incoming / sha256[:2] / f"{sha256}.{ext}")


IngestJobs = list[tuple[str, str]]  # (sha256, path of the file to validate relative to the workspace root)


def validation_jobs(workspace: Workspace, files: Mapping[str, str], config: IngestConfig) -> IngestJobs:
    """(sha256, relative path) of each file that needs validating: no reusable record under this policy, file present.

    No side effects.
    """
    jobs: IngestJobs = []
    for sha256, ext in files.items():
        if _reusable(workspace, sha256, ext, config) is not None:
            continue
        source = _source(workspace, sha256, ext)
        if source.is_file():
            jobs.append((sha256, workspace.relative(source)))
    return jobs


def validate_files(
    workspace: Workspace, jobs: Iterable[tuple[str, str]], config: IngestConfig, hashing: Hashing | None = None
) -> list[dict[str, Any]]:
    """Check each (sha256, relative path) without moving it: ImageCheck dicts with "sha256" added, and "phash" and
    "dhash" from the same decode when hashing is given ("" otherwise, or when the file is not ok)."""
    rows = []
    jobs = list(jobs)
    for sha256, relative in progress(jobs, len(jobs), "ingest: validating"):
        source = _planned_source(workspace, sha256, relative)
        if source is None:
            log.info("ingest: %s is gone (and no copy of %s is in store/ or quarantine/)", relative, sha256[:12])
            continue  # the merge finds it missing and says so in the catalog
        done = validate_job(_job(sha256, source, config, hashing))
        main, second = done.hashes or ("", "")
        rows.append({"sha256": sha256, **dataclasses.asdict(done.check), "phash": main, "dhash": second})
    return rows


def _planned_source(workspace: Workspace, sha256: str, relative: str) -> Path | None:
    """The file a job planned earlier validates: where the plan saw it, else the copy of the same bytes an ingest
    since moved to store/ or quarantine/ (a plan kept in the cache outlives its incoming/ files); None if neither."""
    planned = workspace.root / relative
    if planned.is_file():
        return planned
    return next(iter(_stored_copies(workspace, sha256, planned.suffix[1:])), None)


def checks_by_sha(rows: Iterable[Mapping[str, Any]]) -> dict[str, ImageCheck]:
    """sha256 -> ImageCheck of validate_files' dicts."""
    skip = {"sha256", *HASH_COLUMNS}
    return {str(row["sha256"]): ImageCheck(**{k: v for k, v in row.items() if k not in skip}) for row in rows}


def hashes_by_sha(rows: Iterable[Mapping[str, Any]]) -> dict[str, tuple[str, str]]:
    """sha256 -> (hash, dhash) of validate_files' dicts that carry hashes."""
    return {str(row["sha256"]): (str(row["phash"]), str(row["dhash"])) for row in rows if row.get("phash")}


def place_files(
    workspace: Workspace,
    files: Mapping[str, str],
    config: IngestConfig,
    workers: int | None = None,
    checks: Mapping[str, ImageCheck] | None = None,
    hashing: Hashing | None = None,
    hashes: Hashes | None = None,
) -> dict[str, Placement]:
    """Validate and place each sha256 -> ext not ingested before; reuse earlier records for the rest.

    checks: results of validating some files already (validate_files), hashes: their hashes; the others are
    validated here. With hashing = (algorithm, hash_size), the hashes of the new ok files (computed by the decode
    that validates them) are added to the fingerprint cache of that algorithm and size.
    """
    known = dict(checks or {})
    found = dict(hashes or {})
    placements: dict[str, Placement] = {}
    jobs: list[ValidateJob] = []
    for sha256, ext in files.items():
        incoming = workspace.incoming / sha256[:2] / f"{sha256}.{ext}"
        earlier = _reusable(workspace, sha256, ext, config)
        if earlier is not None:
            placements[sha256] = earlier
            _drop_redundant_incoming(incoming, sha256)
            continue
        source = _source(workspace, sha256, ext)
        if not source.is_file():
            placements[sha256] = Placement("", ImageCheck(False, MISSING_FILE, None, None, "", "", None, 0, False))
            continue
        jobs.append(_job(sha256, source, config, hashing))
    # a sha mismatch describes one particular file, which may have been replaced since: check that again
    late = [job for job in jobs if job.sha256 not in known or known[job.sha256].reason == SHA_MISMATCH]
    for done in _validate_jobs(late, workers).values():
        known[done.sha256] = done.check
        found.pop(done.sha256, None)
        if done.hashes is not None:
            found[done.sha256] = done.hashes
    for job in jobs:
        placements[job.sha256] = _place(workspace, job.sha256, Path(job.source), known[job.sha256], config)
    placed = [workspace.root / placements[job.sha256].path for job in jobs]
    sync_files([validation_record_path(workspace, job.sha256, config) for job in jobs] + placed)  # records, moves
    n_known = len(files) - len(jobs)
    log.info("ingest: %d files, %d validated now (%d here), %d known before", len(files), len(jobs), len(late), n_known)
    if hashing is not None:
        _store_hashes(workspace, placements, found, hashing)
    return placements


def _store_hashes(workspace: Workspace, placements: Mapping[str, Placement], found: Hashes, hashing: Hashing) -> None:
    """Put the hashes of the ok files into the fingerprint cache."""
    ok = {sha: pair for sha, pair in found.items() if sha in placements and placements[sha].check.ok}
    if ok:
        added = store_hashes(workspace, ok, *hashing)
        log.info("ingest: %d new hashes in the fingerprint cache (%s-%d)", added, *hashing)


def _catalog_row(entry: Mapping[str, Any], placement: Placement) -> dict[str, Any]:
    check = placement.check
    missing = check.reason == MISSING_FILE
    return {
        **{name: entry[name] for name in LOG_COLUMNS if name != "ext"},
        "path": placement.path,
        "width": check.width,
        "height": check.height,
        "format": check.format,
        "mode": check.mode,
        "exif_orientation": check.exif_orientation,
        "n_bytes": entry.get("n_bytes") if missing else check.n_bytes,
        "status": STATUS_OK if check.ok else f"{INVALID_PREFIX}{check.reason}",
    }


def _require_log_columns(columns: Iterable[str]) -> None:
    missing = [name for name in LOG_COLUMNS if name not in set(columns)]
    if missing:
        raise ValueError(f"crawl log is missing columns {missing}; expected at least {list(LOG_COLUMNS)}")


def files_to_ingest(crawl_log: pd.DataFrame) -> dict[str, str]:
    """sha256 -> ext of the crawl log's fetched files (first row of each, in log order); checks the columns."""
    _require_log_columns(crawl_log.columns)
    return _unique_files(_fetched(crawl_log))


def _fetched(crawl_log: pd.DataFrame) -> pd.DataFrame:
    return crawl_log[crawl_log["sha256"].fillna("").astype(str) != ""]


def ingest(
    workspace: Workspace,
    crawl_log: pd.DataFrame,
    config: IngestConfig,
    workers: int | None = None,
    checks: Mapping[str, ImageCheck] | None = None,
    hashing: Hashing | None = None,
    hashes: Hashes | None = None,
) -> pd.DataFrame:
    """Catalog with one row per successful crawl-log row (sha256 != ""), in log order; idempotent.

    New files are validated (in a process pool of up to `workers` where it pays; `checks` and `hashes` give
    results already computed, e.g. by mapped validate_files chunks) and moved to store/ or quarantine/; files seen
    before reuse their validation record. A missing file gives invalid:missing_file. With hashing = (algorithm,
    hash_size) the new ok files' perceptual hashes, from the same decode, go to the fingerprint cache.
    """
    _require_log_columns(crawl_log.columns)
    fetched = _fetched(crawl_log)
    if fetched.empty:
        return empty_catalog()
    placements = place_files(workspace, _unique_files(fetched), config, workers, checks, hashing, hashes)
    records = fetched.to_dict("records")
    return new_rows(_catalog_row(entry, placements[str(entry["sha256"])]) for entry in records)


def missing_notes(catalog: pd.DataFrame) -> list[str]:
    """A loud note (and a warning) when files the crawl log lists are gone: their rows leave the training data."""
    missing = catalog[catalog["status"] == f"{INVALID_PREFIX}{MISSING_FILE}"].drop_duplicates("sha256")
    if missing.empty:
        return []
    shown = ", ".join(f"{row.sha256[:12]} ({row.url})" for row in missing.head(5).itertuples())
    more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
    note = (
        f"{len(missing)} file(s) of the crawl log are gone from the workspace and could not be fetched again: "
        f"{shown}{more}. They are marked invalid:missing_file and leave the training data"
    )
    log.warning(note)
    return [note]


def ingest_summary(catalog: pd.DataFrame) -> dict[str, int]:
    """Counts: ok, invalid, and invalid.<reason> per reason kind (the part before any ':')."""
    invalid = catalog[is_invalid(catalog["status"])]
    reasons = invalid["status"].str.removeprefix(INVALID_PREFIX).str.split(":", n=1).str[0]
    summary = {"ok": int((catalog["status"] == STATUS_OK).sum()), "invalid": len(invalid)}
    summary.update({f"invalid.{reason}": int(n) for reason, n in reasons.value_counts().sort_index().items()})
    return summary
