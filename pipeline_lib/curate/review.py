"""Manual review: append-only decisions, the gate that applies them, and the waiting-run record.

The review pack (thumbnails, hints, the pack page) is in review_pack; the review page in review_server.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from pipeline_lib.core.catalog import STATUS_OK, STATUS_PENDING, STATUS_REJECTED
from pipeline_lib.core.workspace import Workspace, atomic_write_text, bytes_sha256

log = logging.getLogger(__name__)

DECISIONS = ("approve", "reject")
AUTO_REVIEWER = "auto"  # the reviewer of approvals that review.mode auto records
MODEL_REVIEWER_PREFIX = "model:"  # review.mode assisted: approvals by model:<name>/<version>
REJECT_REASONS = ("duplicate", "several_people", "unrelated", "wrong_label", "other", "")
MODES = ("auto", "assisted", "require", "off")


class ReviewError(ValueError):
    """A decision is malformed (unknown value, unknown image, bad CSV)."""


class ReviewPending(RuntimeError):
    """The gate is in require mode and images still await a decision."""


@dataclass(frozen=True)
class Decision:
    """One human decision about one image (by sha256); the latest per image wins."""

    sha256: str
    decision: str
    reason: str = ""
    reviewer: str = ""
    when: str = ""
    score: float | None = None  # the image's suspicion in the review queue when it was decided
    suggested: str = ""  # what the queue suggested then (approve / reject), "" when there was no queue

    def validated(self, known: set[str] | None = None) -> Decision:
        """Return a copy with a timestamp; raise ReviewError if a value is not allowed."""
        if self.decision not in DECISIONS:
            raise ReviewError(f"decision for {self.sha256[:12]} must be one of {DECISIONS}, got {self.decision!r}")
        if self.reason not in REJECT_REASONS:
            raise ReviewError(f"reason for {self.sha256[:12]} must be one of {REJECT_REASONS}, got {self.reason!r}")
        if self.suggested not in ("", *DECISIONS):
            raise ReviewError(f"suggestion for {self.sha256[:12]} must be approve or reject, got {self.suggested!r}")
        if self.score is not None and not 0.0 <= self.score <= 1.0:
            raise ReviewError(f"score for {self.sha256[:12]} must be in 0..1, got {self.score!r}")
        if known is not None and self.sha256 not in known:
            raise ReviewError(f"no image with sha256 {self.sha256!r} in the catalog")
        when = self.when or datetime.now(UTC).isoformat()
        return replace(self, when=when)

    def line(self) -> str:
        """The JSON line written to decisions.jsonl (score and suggestion only when the queue gave them)."""
        record = {k: v for k, v in asdict(self).items() if k not in ("score", "suggested") or v not in (None, "")}
        return json.dumps(record, ensure_ascii=False)

    @property
    def by_model(self) -> bool:
        """Whether a model made this decision (review.mode assisted)."""
        return self.reviewer.startswith(MODEL_REVIEWER_PREFIX)


@dataclass(frozen=True)
class Mark:
    """What the review queue said of one image: its suspicion and the suggested decision."""

    score: float
    suggested: str


def decisions_path(workspace: Workspace) -> Path:
    return workspace.review / "decisions.jsonl"


def damaged_decisions_path(workspace: Workspace) -> Path:
    """Where lines that are not decisions (a line cut off by a crash) are set aside, never deleted."""
    return workspace.review / "decisions.jsonl.damaged"


def thumbnail_folder(workspace: Workspace) -> Path:
    """Where the cached review thumbnails are kept (review_pack.thumbnails_made_now says which code made them)."""
    return workspace.review / "pack" / "thumbs"


def thumbnail_path(workspace: Workspace, sha256: str) -> Path:
    """Where the cached review thumbnail of one image is kept."""
    return thumbnail_folder(workspace) / f"{sha256}.jpg"


@contextlib.contextmanager
def _locked_decisions(workspace: Workspace) -> Iterator[int]:
    """The decisions file opened for appending under an exclusive flock (threads and processes take turns)."""
    path = decisions_path(workspace)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    """Write data fully, then fsync."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.fsync(fd)


def _parse(line: bytes) -> Decision | None:
    """The decision on one line, or None if the line is not one."""
    try:
        decision = Decision(**json.loads(line.decode("utf-8")))
    except (UnicodeDecodeError, json.JSONDecodeError, TypeError):
        return None
    return decision if isinstance(decision.sha256, str) and decision.sha256 else None


def _set_aside(workspace: Workspace, lines: list[bytes], why: str) -> str:
    """Append lines to decisions.jsonl.damaged (fsynced); return the message that says so."""
    target = damaged_decisions_path(workspace)
    fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        _write_all(fd, b"".join(line.rstrip(b"\n") + b"\n" for line in lines))
    finally:
        os.close(fd)
    message = f"{decisions_path(workspace)}: {why}; set aside in {target}, no decision was lost or merged with it"
    log.warning(message)
    return message


def _repair_tail(workspace: Workspace, fd: int) -> str:
    """Under the lock: a last line without its newline (a crash mid-append) is completed or set aside; a message."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return ""
    data = os.pread(fd, size, 0)
    start = data.rfind(b"\n") + 1
    tail = data[start:]
    if _parse(tail) is not None:  # the whole line made it, only its newline did not
        _write_all(fd, b"\n")
        return ""
    message = _set_aside(workspace, [tail], f"the last line was cut off ({len(tail)} bytes, a crash mid-write?)")
    os.ftruncate(fd, start)
    os.fsync(fd)
    return message


def set_aside_cut_off_line(workspace: Workspace) -> str:
    """Set aside a cut-off last line of the decisions file (see _repair_tail); the message, or "" if none."""
    if not decisions_path(workspace).is_file():
        return ""
    with _locked_decisions(workspace) as fd:
        return _repair_tail(workspace, fd)


def append_decisions(workspace: Workspace, decisions: list[Decision], known: set[str] | None = None) -> int:
    """Validate all decisions first, then append them as whole lines (flushed and fsynced); return the count.

    A cut-off last line left by a crash is set aside first (decisions.jsonl.damaged), never merged with a new line.
    """
    checked = [decision.validated(known) for decision in decisions]
    data = b"".join((d.line() + "\n").encode("utf-8") for d in checked)
    with _locked_decisions(workspace) as fd:
        _repair_tail(workspace, fd)
        _write_all(fd, data)
    return len(checked)


def read_decisions(workspace: Workspace) -> dict[str, Decision]:
    """Latest decision per sha256 (later lines win); a corrupt line raises ReviewError naming it.

    A cut-off last line (no newline: a crash mid-append) is skipped with a warning; the next append sets it aside.
    """
    path = decisions_path(workspace)
    latest: dict[str, Decision] = {}
    if not path.is_file():
        return latest
    data = path.read_bytes()
    lines = data.split(b"\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        decision = _parse(line)
        if decision is None and number == len(lines):
            log.warning("%s: the last line is cut off (a crash mid-write?) and is ignored", path)
            continue
        if decision is None:
            raise ReviewError(
                f"{path}:{number} is not a valid decision line; `aidetect doctor --repair` sets it aside "
                f"into {damaged_decisions_path(workspace).name}"
            )
        latest[decision.sha256] = decision
    return latest


def repair_decisions(workspace: Workspace) -> list[str]:
    """Set aside every line that is not a decision (doctor --repair); the messages (none when all are fine)."""
    if not decisions_path(workspace).is_file():
        return []
    with _locked_decisions(workspace) as fd:
        messages = [m for m in [_repair_tail(workspace, fd)] if m]
        data = os.pread(fd, os.fstat(fd).st_size, 0)
        lines = [line for line in data.split(b"\n") if line.strip()]
        bad = [line for line in lines if _parse(line) is None]
        if not bad:
            return messages
        good = b"".join(line + b"\n" for line in lines if _parse(line) is not None)
        messages.append(_set_aside(workspace, bad, f"{len(bad)} line(s) are not decisions"))
        os.ftruncate(fd, 0)
        _write_all(fd, good)  # O_APPEND: written from the (now empty) start, same file, under the lock
    return messages


def decisions_digest(workspace: Workspace) -> str:
    """Digest of the decisions file (part of the gate's cache key)."""
    path = decisions_path(workspace)
    return bytes_sha256(path.read_bytes()) if path.is_file() else ""


def read_decisions_csv(path: Path, reviewer: str = "csv") -> list[Decision]:
    """Decisions from a CSV with columns sha256,decision[,reason]; rows with an empty decision are skipped."""
    if not Path(path).is_file():
        raise ReviewError(f"decisions CSV not found: {path}")
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = {"sha256", "decision"} - set(reader.fieldnames or [])
        if missing:
            raise ReviewError(f"{path} lacks column(s) {sorted(missing)}; expected sha256,decision[,reason]")
        rows = [row for row in reader if (row.get("decision") or "").strip()]
    return [
        Decision(row["sha256"].strip(), row["decision"].strip(), (row.get("reason") or "").strip(), reviewer)
        for row in rows
    ]


@dataclass(frozen=True)
class GateOutcome:
    """The catalog after the gate, with counts."""

    catalog: pd.DataFrame
    approved: int
    rejected: int
    pending: int
    auto_approved: int


def apply_decisions(catalog: pd.DataFrame, decisions: dict[str, Decision], mode: str) -> GateOutcome:
    """Apply decisions to status-ok rows; undecided rows are approved (auto/off) or pending (require, assisted)."""
    if mode not in MODES:
        raise ValueError(f"review.mode must be one of {', '.join(MODES)}, got {mode!r}")
    waits = mode in ("require", "assisted")
    out = catalog.copy()
    candidates = out["status"] == STATUS_OK
    decided = out["sha256"].map(lambda sha: decisions[sha].decision if sha in decisions else "")
    rejected = candidates & (decided == "reject")
    undecided = candidates & (decided == "")
    out.loc[rejected, "status"] = STATUS_REJECTED
    if waits:
        out.loc[undecided, "status"] = STATUS_PENDING
    by_auto = out["sha256"].map(lambda sha: sha in decisions and decisions[sha].reviewer == AUTO_REVIEWER)
    return GateOutcome(
        catalog=out,
        approved=int((candidates & (decided == "approve")).sum()),
        rejected=int(rejected.sum()),
        pending=int(undecided.sum()) if waits else 0,
        auto_approved=int((candidates & (decided == "approve") & by_auto).sum())
        + (int(undecided.sum()) if not waits else 0),
    )


def model_numbers(decisions: dict[str, Decision], shas: set[str]) -> dict[str, int]:
    """Of the images shas (latest decisions): approved by a model, and suspects a person approved (overturned)."""
    latest = [decisions[sha] for sha in shas if sha in decisions]
    return {
        "approved_by_model": sum(d.decision == "approve" and d.by_model for d in latest),
        "model_suspects_overturned": sum(
            d.suggested == "reject" and d.decision == "approve" and not d.by_model for d in latest
        ),
    }


def pending_message(pending: int, workspace: Workspace, reason: str = "") -> str:
    """How to continue when the gate stops for review (reason: e.g. that the pause timed out)."""
    lead = f"{reason}: " if reason else ""
    return (
        f"{lead}{pending} image(s) await review in {workspace.root}; they do not reach "
        f"training. To continue: `aidetect review serve --workspace {workspace.root}` (a page on 127.0.0.1), decide "
        f"them, then `aidetect run --workspace {workspace.root}` again: every stage before the gate comes back Cached. "
        f"Alternatives: `aidetect review export todo.csv --workspace {workspace.root}`, fill the decision column "
        "(approve/reject) and `aidetect review apply todo.csv`; or set review.mode=auto. "
        f"The review pack is {workspace.review / 'pack' / 'index.html'}."
    )


def undecided(catalog: pd.DataFrame, decisions: dict[str, Decision]) -> pd.DataFrame:
    """Rows with status ok (or pending_review) and no decision yet, one per sha256, in catalog order."""
    candidates = catalog[catalog["status"].isin([STATUS_OK, STATUS_PENDING])]
    return candidates[~candidates["sha256"].isin(decisions)].drop_duplicates("sha256")


def approve_remaining(
    workspace: Workspace,
    catalog: pd.DataFrame,
    reviewer: str,
    group: str | None = None,
    note: str = "",
    marks: dict[str, Mark] | None = None,
    below: float | None = None,
) -> list[str]:
    """Append an approve decision for every undecided image (of one group if given; with `below`, only images whose
    mark scores less); marks add each image's score and suggestion to its line. The approved sha256, in order."""
    marks = marks or {}
    todo = undecided(catalog, read_decisions(workspace))
    if group is not None:
        todo = todo[todo["group"] == group]
    shas = [str(sha) for sha in todo["sha256"]]
    if below is not None:
        shas = [sha for sha in shas if sha in marks and marks[sha].score < below]
    decisions = [marked(Decision(sha, "approve", "", reviewer), marks) for sha in shas]
    if note:
        log.info("approve remaining (%s, %d images): %s", reviewer, len(decisions), note)
    if decisions:
        append_decisions(workspace, decisions)
    return shas


def marked(decision: Decision, marks: dict[str, Mark] | None) -> Decision:
    """The decision with its image's queue mark (score, suggestion) from marks, if any."""
    mark = (marks or {}).get(decision.sha256)
    return decision if mark is None else replace(decision, score=round(mark.score, 4), suggested=mark.suggested)


def record_auto_approvals(workspace: Workspace, catalog: pd.DataFrame) -> int:
    """review.mode auto: append an approval (reviewer "auto") for every undecided image; return the count.

    So decisions.jsonl, the review page, `aidetect status` and `review status` say what was trained on. A later
    human decision (a later line) still wins; images decided before keep their decision.
    """
    return len(approve_remaining(workspace, catalog, AUTO_REVIEWER))


def record_model_approvals(
    workspace: Workspace, catalog: pd.DataFrame, marks: dict[str, Mark], threshold: float, reviewer: str
) -> int:
    """review.mode assisted: approve every undecided image whose suspicion is below threshold, recorded with the
    model as reviewer and the image's score; return the count. A later human decision (a later line) still wins."""
    if not reviewer.startswith(MODEL_REVIEWER_PREFIX):
        raise ValueError(f"a model's reviewer name starts with {MODEL_REVIEWER_PREFIX!r}, got {reviewer!r}")
    return len(approve_remaining(workspace, catalog, reviewer, marks=marks, below=threshold))


# --- the waiting run (written by the gate, read by `aidetect review done` and the review page) ---


def waiting_path(workspace: Workspace) -> Path:
    return workspace.review / "waiting.json"


def write_waiting(workspace: Workspace, flow_run_id: str, how: str, pending: int, url: str = "") -> Path:
    """Record which flow run waits at the gate (how: paused | suspended) and where its review page is."""
    info = {"flow_run_id": flow_run_id, "how": how, "pending": pending, "url": url}
    info["since"] = datetime.now(UTC).isoformat()
    return atomic_write_text(waiting_path(workspace), json.dumps(info, indent=1))


def read_waiting(workspace: Workspace) -> dict[str, object] | None:
    """The waiting-run record, or None; a corrupt file raises ReviewError naming it."""
    path = waiting_path(workspace)
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ReviewError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(info, dict) or not info.get("flow_run_id"):
        raise ReviewError(f"{path} lacks flow_run_id")
    return info


def clear_waiting(workspace: Workspace, flow_run_id: str) -> None:
    """Remove the waiting record if it still names flow_run_id."""
    info = read_waiting(workspace)
    if info is not None and str(info["flow_run_id"]) == str(flow_run_id):
        waiting_path(workspace).unlink(missing_ok=True)


def export_pending(catalog: pd.DataFrame, path: Path) -> int:
    """Write a CSV (sha256,label,group,url,decision,reason) of pending images to fill in; return the count."""
    pending = catalog[catalog["status"] == STATUS_PENDING].drop_duplicates("sha256")
    table = pending[["sha256", "label", "group", "url"]].assign(decision="", reason="")
    table.to_csv(path, index=False)
    return len(table)
