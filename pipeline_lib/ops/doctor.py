"""`aidetect doctor`: check a workspace (snapshots, store against the crawl log, decisions, checkpoints, the MLflow
store, the lock, leftovers of killed runs) and repair what is safe to repair.

Nothing is deleted that could be needed: a damaged file is moved into damaged/ (same relative path) and the stage
that wrote it is recomputed by the next run (with --refresh-cache); only temporary files of killed writes are removed.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline_lib.acquire import recovery
from pipeline_lib.acquire.crawl_log import CrawlLogError, crawl_log_path, read_crawl_log
from pipeline_lib.core.catalog import CatalogError
from pipeline_lib.core.config import SourcesConfig
from pipeline_lib.core.workspace import Workspace, file_sha256, lock_path, read_lock_holder
from pipeline_lib.curate import review

log = logging.getLogger(__name__)

SNAPSHOT_NAME = re.compile(r"^.+-([0-9a-f]{16})\.parquet$")
DAMAGED_DIR = "damaged"
REBUILD = "run again with --refresh-cache to rebuild it"


@dataclass(frozen=True)
class Finding:
    """One thing doctor looked at: the file to look at, what is wrong ("" when fine), what repair did."""

    check: str
    path: str
    problem: str = ""
    repaired: str = ""

    @property
    def open(self) -> bool:
        """A problem that is still there."""
        return bool(self.problem) and not self.repaired

    def line(self) -> str:
        """'[ok]', '[repaired]' or '[damaged]' with the check, the file and what happened."""
        if not self.problem:
            return f"[ok]       {self.check}: {self.path}"
        tail = f" -> {self.repaired}" if self.repaired else ""
        return f"[{'repaired' if self.repaired else 'damaged'}] {self.check}: {self.path}: {self.problem}{tail}"


@dataclass(frozen=True)
class Doctor:
    """What doctor may do: repair, hash every stored file (deep), the sources to fetch lost files from."""

    workspace: Workspace
    repair: bool = False
    deep: bool = False
    sources: SourcesConfig | None = None
    tracking_uri: str | None = None  # None: the embedded store of the workspace
    experiment: str = "aidetect"

    def set_aside(self, path: Path, then: str = REBUILD) -> str:
        """Move a damaged file into damaged/ (same relative path) when repairing; the words for the report."""
        if not self.repair:
            return ""
        target = self.workspace.root / DAMAGED_DIR / self.workspace.relative(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(path, target)
        return f"moved to {self.workspace.relative(target)}" + (f"; {then}" if then else "")


def check_snapshots(doctor: Doctor) -> list[Finding]:
    """Every catalog/crawl snapshot still holds the bytes its name's digest promises, and the crawl log reads."""
    findings = []
    for folder in (doctor.workspace.catalog, doctor.workspace.crawl):
        for path in sorted(folder.glob("*.parquet")):
            match = SNAPSHOT_NAME.match(path.name)
            if match is None or file_sha256(path)[:16] == match.group(1):
                continue
            problem = "its content does not match the digest in its name (truncated or edited)"
            findings.append(Finding("snapshot", str(path), problem, doctor.set_aside(path)))
    try:
        read_crawl_log(doctor.workspace)
    except CrawlLogError as error:
        path = crawl_log_path(doctor.workspace)
        repaired = doctor.set_aside(path, "a new log starts: every URL is fetched again")
        findings.append(Finding("crawl log", str(path), str(error).split(";")[0], repaired))
    return findings or [Finding("snapshots", str(doctor.workspace.catalog))]


def _damaged_store_files(doctor: Doctor) -> list[Path]:
    """Stored files whose bytes do not hash to their name (only with deep: every file is read)."""
    if not doctor.deep:
        return []
    return [p for p in sorted(doctor.workspace.store.glob("*/*.*")) if file_sha256(p) != p.name.split(".", 1)[0]]


def check_store(doctor: Doctor) -> list[Finding]:
    """Every file the crawl log fetched is held (store/, quarantine/ or incoming/); with deep, has its sha256."""
    findings = []
    for path in _damaged_store_files(doctor):
        findings.append(Finding("store", str(path), "its bytes do not match its sha256", doctor.set_aside(path, "")))
    try:
        crawl_log = read_crawl_log(doctor.workspace)
    except CrawlLogError:
        return findings  # reported by check_snapshots
    missing = recovery.missing_files(doctor.workspace, crawl_log)
    restored: dict[str, str] = {}
    if missing and doctor.repair:
        restored = recovery.restore_missing(doctor.workspace, crawl_log, doctor.sources or SourcesConfig()).restored
    for sha256, rows in missing.items():
        fixed = f"fetched again from {rows[0][0]}" if sha256 in restored else ""
        findings.append(Finding("store", f"{sha256} ({rows[0][0]})", "missing from the workspace, or truncated", fixed))
    return findings or [Finding("store", str(doctor.workspace.store))]


def check_decisions(doctor: Doctor) -> list[Finding]:
    """Every line of review/decisions.jsonl is a decision (a cut-off or corrupt line is set aside on repair)."""
    path = review.decisions_path(doctor.workspace)
    problem = ""
    data = path.read_bytes() if path.is_file() else b""
    if data and not data.endswith(b"\n"):
        problem = "the last line is cut off (a crash mid-write)"
    try:
        review.read_decisions(doctor.workspace)
    except review.ReviewError as error:
        problem = str(error)
    if not problem:
        return [Finding("decisions", str(path))]
    repaired = ""
    if doctor.repair and review.repair_decisions(doctor.workspace):
        repaired = f"the bad line(s) set aside in {review.damaged_decisions_path(doctor.workspace).name}"
    return [Finding("decisions", str(path), problem, repaired)]


def _checkpoint_problem(path: Path) -> str:
    """Why a best.pt/last.pt cannot be loaded (weights only), or ""."""
    import torch

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many types for bad files
        return f"unreadable ({type(error).__name__}: {str(error).splitlines()[0][:200]})"
    if not isinstance(payload, dict) or "format" not in payload:
        return "not an aidetect checkpoint"
    return ""


def check_checkpoints(doctor: Doctor) -> list[Finding]:
    """Every models/*/best.pt and last.pt loads with weights_only (a damaged one is set aside: training restarts)."""
    findings = []
    for path in sorted(doctor.workspace.models.glob("*/*.pt")):
        problem = _checkpoint_problem(path)
        if problem:
            repaired = doctor.set_aside(path, "training in that folder starts over")
            findings.append(Finding("checkpoint", str(path), problem, repaired))
    return findings or [Finding("checkpoints", str(doctor.workspace.models))]


def check_mlflow_db(doctor: Doctor) -> list[Finding]:
    """The embedded MLflow store passes SQLite's quick_check (never repaired here: it holds every past run)."""
    from pipeline_lib.core.tracking.workspace_store import sqlite_problem

    path = doctor.workspace.root / "mlflow.db"
    if not path.is_file():
        return []
    result = sqlite_problem(path)
    if result is None:
        return [Finding("mlflow", str(path))]
    problem = f"not a sound SQLite database ({result}); restore it from a backup, or move it away to start a new one"
    return [Finding("mlflow", str(path), problem)]


def check_runs(doctor: Doctor) -> list[Finding]:
    """MLflow runs of this workspace that a killed process left RUNNING; marked KILLED on repair."""
    from pipeline_lib.core.tracking.runs import end_orphaned_runs
    from pipeline_lib.core.tracking.store import tracking_uri

    uri = tracking_uri(doctor.tracking_uri, doctor.workspace)
    if uri.startswith("sqlite:") and not (doctor.workspace.root / "mlflow.db").is_file():
        return []
    if not doctor.repair:
        return []  # finding them needs the same query as ending them: reported when repairing
    try:
        ended = end_orphaned_runs(uri, doctor.experiment, doctor.workspace)
    except Exception as error:  # a damaged store raises MLflow's and SQLAlchemy's own types
        return [Finding("mlflow runs", uri, f"cannot be searched: {type(error).__name__}")]
    return [Finding("mlflow run", run_id, "left RUNNING by a killed process", "marked KILLED") for run_id in ended]


def check_lock(doctor: Doctor) -> list[Finding]:
    """Who holds the workspace lock: nobody, a live run, or a killed one (taken over by the next run)."""
    holder = read_lock_holder(lock_path(doctor.workspace))
    if holder is None or (holder.pid == os.getpid() and holder.host == socket.gethostname()):
        return []  # free, or held by this doctor --repair
    alive = holder.is_alive()
    path = str(lock_path(doctor.workspace))
    if alive is False:
        return [Finding("lock", path, f"left by {holder.describe()}, which died", "the next run takes it over")]
    return [Finding("lock", f"{path}: held by {holder.describe()} (a run in progress)")]


def check_temporary_files(doctor: Doctor) -> list[Finding]:
    """Half-written temporary files (.<name>.*.part) that killed writes left behind; removed on repair."""
    leftovers = sorted(p for p in doctor.workspace.root.rglob(".*.part") if p.is_file())
    if not leftovers:
        return []
    if doctor.repair:
        for path in leftovers:
            path.unlink()
    problem = f"{len(leftovers)} temporary file(s) left by interrupted writes"
    return [Finding("temporary files", str(doctor.workspace.root), problem, "removed" if doctor.repair else "")]


CHECKS: tuple[Callable[[Doctor], list[Finding]], ...] = (
    check_lock,
    check_snapshots,
    check_store,
    check_decisions,
    check_checkpoints,
    check_mlflow_db,
    check_runs,
    check_temporary_files,
)


def diagnose(doctor: Doctor) -> list[Finding]:
    """Run every check (repairing where doctor.repair allows) and return what each found."""
    findings: list[Finding] = []
    for check in CHECKS:
        try:
            findings.extend(check(doctor))
        except (OSError, CatalogError, ValueError, sqlite3.DatabaseError) as error:
            findings.append(Finding(check.__name__.removeprefix("check_"), str(doctor.workspace.root), str(error)))
    return findings
