"""Ingest: validate crawled files once, move them into the store (or quarantine), build the catalog."""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import os
from collections.abc import Iterable, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline_lib.catalog import INVALID_PREFIX, STATUS_OK, empty_catalog, is_invalid, new_rows
from pipeline_lib.config import IngestConfig
from pipeline_lib.validate import ImageCheck, check_image
from pipeline_lib.workspace import Workspace, atomic_write_text, file_sha256

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
PARALLEL_MIN_FILES = 64
MISSING_FILE = "missing_file"
SHA_MISMATCH = "sha_mismatch"


@dataclass(frozen=True)
class Placement:
    """Where one sha256's file lives after ingest (path relative to the workspace; "" if missing) and its check."""

    path: str
    check: ImageCheck


@dataclass(frozen=True)
class _Job:
    """A file to validate (picklable, for the process pool)."""

    sha256: str
    source: str
    min_side: int
    max_pixels: int
    animated: str


def validation_record_path(workspace: Workspace, sha256: str) -> Path:
    """Where the validation record of one sha256 is kept."""
    return workspace.cache / "validation" / f"{sha256}.json"


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


def recorded_check(workspace: Workspace, sha256: str) -> ImageCheck | None:
    """What ingest found when it validated sha256 (its validation record), or None if it never did."""
    return _read_record(validation_record_path(workspace, sha256))


def _write_record(workspace: Workspace, sha256: str, check: ImageCheck) -> None:
    text = json.dumps(dataclasses.asdict(check), sort_keys=True)
    atomic_write_text(validation_record_path(workspace, sha256), text)


def _stored_copies(workspace: Workspace, sha256: str, ext: str) -> list[Path]:
    """Existing copies of sha256 in store/ or quarantine/, the log's extension first."""
    preferred = [workspace.store_path(sha256, ext), _quarantine_path(workspace, sha256, ext)]
    others = [*workspace.store.glob(f"{sha256[:2]}/{sha256}.*"), *workspace.quarantine.glob(f"{sha256}.*")]
    return [p for p in preferred if p.is_file()] + sorted(p for p in others if p not in preferred)


def _target(workspace: Workspace, sha256: str, ext: str, check: ImageCheck) -> Path:
    return workspace.store_path(sha256, ext) if check.ok else _quarantine_path(workspace, sha256, ext)


def _reusable(workspace: Workspace, sha256: str, ext: str) -> Placement | None:
    """The earlier placement of sha256 if both its record and its file (where the record says) still exist."""
    check = _read_record(validation_record_path(workspace, sha256))
    if check is None:
        return None
    for copy in _stored_copies(workspace, sha256, ext):
        if copy == _target(workspace, sha256, copy.suffix[1:], check):
            return Placement(workspace.relative(copy), check)
    return None


def _validate_job(job: _Job) -> tuple[str, ImageCheck]:
    """Check that the file's bytes match its sha256 name, then validate it (runs in a worker process)."""
    source = Path(job.source)
    if file_sha256(source) != job.sha256:
        n_bytes = source.stat().st_size
        return job.sha256, ImageCheck(False, SHA_MISMATCH, None, None, "", "", None, n_bytes, False)
    return job.sha256, check_image(source, job.min_side, job.max_pixels, job.animated)  # type: ignore[arg-type]


def _validate_jobs(jobs: list[_Job], workers: int | None) -> dict[str, ImageCheck]:
    """Validate files sequentially, or in a process pool (spawned: safe beside threads) when there are many."""
    n_workers = min(workers or os.cpu_count() or 1, len(jobs))
    if n_workers <= 1 or len(jobs) < PARALLEL_MIN_FILES:
        return dict(map(_validate_job, jobs))
    chunksize = max(1, len(jobs) // (4 * n_workers))
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=n_workers, mp_context=context) as pool:
        return dict(pool.map(_validate_job, jobs, chunksize=chunksize))


def _place(workspace: Workspace, sha256: str, source: Path, check: ImageCheck) -> Placement:
    """Move a validated file (same filesystem, byte-identical) to store/ or quarantine/, then record its check."""
    target = _target(workspace, sha256, source.suffix[1:], check)
    if source != target:
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)
    _write_record(workspace, sha256, check)
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


def validation_jobs(workspace: Workspace, files: Mapping[str, str]) -> IngestJobs:
    """(sha256, relative path) of each file that needs validating: no reusable record, file present. No side effects."""
    jobs: IngestJobs = []
    for sha256, ext in files.items():
        if _reusable(workspace, sha256, ext) is not None:
            continue
        source = _source(workspace, sha256, ext)
        if source.is_file():
            jobs.append((sha256, workspace.relative(source)))
    return jobs


def validate_files(workspace: Workspace, jobs: Iterable[tuple[str, str]], config: IngestConfig) -> list[dict[str, Any]]:
    """Check each (sha256, relative path) without moving it: ImageCheck dicts with their "sha256" added."""
    checks = []
    for sha256, relative in jobs:
        job = _Job(sha256, str(workspace.root / relative), config.min_side, config.max_pixels, config.animated)
        checks.append({"sha256": sha256, **dataclasses.asdict(_validate_job(job)[1])})
    return checks


def checks_by_sha(rows: Iterable[Mapping[str, Any]]) -> dict[str, ImageCheck]:
    """sha256 -> ImageCheck of validate_files' dicts."""
    return {str(row["sha256"]): ImageCheck(**{k: v for k, v in row.items() if k != "sha256"}) for row in rows}


def place_files(
    workspace: Workspace,
    files: Mapping[str, str],
    config: IngestConfig,
    workers: int | None = None,
    checks: Mapping[str, ImageCheck] | None = None,
) -> dict[str, Placement]:
    """Validate and place each sha256 -> ext not ingested before; reuse earlier records for the rest.

    checks: results of validating some files already (validate_files); the others are validated here.
    """
    known = dict(checks or {})
    placements: dict[str, Placement] = {}
    jobs: list[_Job] = []
    for sha256, ext in files.items():
        incoming = workspace.incoming / sha256[:2] / f"{sha256}.{ext}"
        earlier = _reusable(workspace, sha256, ext)
        if earlier is not None:
            placements[sha256] = earlier
            _drop_redundant_incoming(incoming, sha256)
            continue
        source = _source(workspace, sha256, ext)
        if not source.is_file():
            placements[sha256] = Placement("", ImageCheck(False, MISSING_FILE, None, None, "", "", None, 0, False))
            continue
        jobs.append(_Job(sha256, str(source), config.min_side, config.max_pixels, config.animated))
    # a sha mismatch describes one particular file, which may have been replaced since: check that again
    late = [job for job in jobs if job.sha256 not in known or known[job.sha256].reason == SHA_MISMATCH]
    known.update(_validate_jobs(late, workers))
    for job in jobs:
        placements[job.sha256] = _place(workspace, job.sha256, Path(job.source), known[job.sha256])
    n_known = len(files) - len(jobs)
    log.info("ingest: %d files, %d validated now (%d here), %d known before", len(files), len(jobs), len(late), n_known)
    return placements


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
) -> pd.DataFrame:
    """Catalog with one row per successful crawl-log row (sha256 != ""), in log order; idempotent.

    New files are validated (in a process pool of `workers` when there are many; `checks` gives results already
    computed, e.g. by mapped validate_files chunks) and moved to store/ or quarantine/; files seen before reuse
    their validation record. A missing file gives invalid:missing_file.
    """
    _require_log_columns(crawl_log.columns)
    fetched = _fetched(crawl_log)
    if fetched.empty:
        return empty_catalog()
    placements = place_files(workspace, _unique_files(fetched), config, workers, checks)
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
