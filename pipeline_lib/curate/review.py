"""Manual review: append-only decisions, the gate that applies them, and the review pack."""

from __future__ import annotations

import contextlib
import csv
import fcntl
import html
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
from PIL import Image, ImageOps

from pipeline_lib.core.catalog import STATUS_OK, STATUS_PENDING, STATUS_REJECTED
from pipeline_lib.core.workspace import Workspace, atomic_path, atomic_write_text, bytes_sha256

log = logging.getLogger(__name__)

DECISIONS = ("approve", "reject")
AUTO_REVIEWER = "auto"  # the reviewer of approvals that review.mode auto records
REJECT_REASONS = ("duplicate", "several_people", "unrelated", "other", "")


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

    def validated(self, known: set[str] | None = None) -> Decision:
        """Return a copy with a timestamp; raise ReviewError if a value is not allowed."""
        if self.decision not in DECISIONS:
            raise ReviewError(f"decision for {self.sha256[:12]} must be one of {DECISIONS}, got {self.decision!r}")
        if self.reason not in REJECT_REASONS:
            raise ReviewError(f"reason for {self.sha256[:12]} must be one of {REJECT_REASONS}, got {self.reason!r}")
        if known is not None and self.sha256 not in known:
            raise ReviewError(f"no image with sha256 {self.sha256!r} in the catalog")
        when = self.when or datetime.now(UTC).isoformat()
        return Decision(self.sha256, self.decision, self.reason, self.reviewer, when)


def decisions_path(workspace: Workspace) -> Path:
    return workspace.review / "decisions.jsonl"


def damaged_decisions_path(workspace: Workspace) -> Path:
    """Where lines that are not decisions (a line cut off by a crash) are set aside, never deleted."""
    return workspace.review / "decisions.jsonl.damaged"


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
    data = b"".join((json.dumps(asdict(d), ensure_ascii=False) + "\n").encode("utf-8") for d in checked)
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
    """Apply decisions to status-ok rows; undecided rows are approved (auto/off) or pending (require)."""
    if mode not in ("auto", "require", "off"):
        raise ValueError(f"review.mode must be auto, require or off, got {mode!r}")
    out = catalog.copy()
    candidates = out["status"] == STATUS_OK
    decided = out["sha256"].map(lambda sha: decisions[sha].decision if sha in decisions else "")
    rejected = candidates & (decided == "reject")
    undecided = candidates & (decided == "")
    out.loc[rejected, "status"] = STATUS_REJECTED
    if mode == "require":
        out.loc[undecided, "status"] = STATUS_PENDING
    by_auto = out["sha256"].map(lambda sha: sha in decisions and decisions[sha].reviewer == AUTO_REVIEWER)
    return GateOutcome(
        catalog=out,
        approved=int((candidates & (decided == "approve")).sum()),
        rejected=int(rejected.sum()),
        pending=int(undecided.sum()) if mode == "require" else 0,
        auto_approved=int((candidates & (decided == "approve") & by_auto).sum())
        + (int(undecided.sum()) if mode != "require" else 0),
    )


def pending_message(pending: int, workspace: Workspace, reason: str = "") -> str:
    """How to continue when the gate stops for review (reason: e.g. that the pause timed out)."""
    lead = f"{reason}: " if reason else ""
    return (
        f"{lead}{pending} image(s) await review in {workspace.root} (review.mode=require); they do not reach "
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
    workspace: Workspace, catalog: pd.DataFrame, reviewer: str, group: str | None = None, note: str = ""
) -> int:
    """Append an approve decision for every undecided image (of one group if given); return the count."""
    todo = undecided(catalog, read_decisions(workspace))
    if group is not None:
        todo = todo[todo["group"] == group]
    decisions = [Decision(sha, "approve", "", reviewer) for sha in todo["sha256"]]
    if note:
        log.info("approve remaining (%s, %d images): %s", reviewer, len(decisions), note)
    return append_decisions(workspace, decisions) if decisions else 0


def record_auto_approvals(workspace: Workspace, catalog: pd.DataFrame) -> int:
    """review.mode auto: append an approval (reviewer "auto") for every undecided image; return the count.

    So decisions.jsonl, the review page, `aidetect status` and `review status` say what was trained on. A later
    human decision (a later line) still wins; images decided before keep their decision.
    """
    return approve_remaining(workspace, catalog, AUTO_REVIEWER)


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


# --- hints that speed up the clean-up ---


@dataclass(frozen=True)
class Hint:
    """One remark about an image; flagged ones deserve a closer look."""

    text: str
    flagged: bool = False


def review_hints(
    workspace: Workspace, catalog: pd.DataFrame, face_rows: pd.DataFrame | None = None, tiny_side: int = 128
) -> dict[str, list[Hint]]:
    """Hints per sha256: tiny images, cross-group near-duplicates, and face counts for face_rows (cached)."""
    hints: dict[str, list[Hint]] = {}
    for row in catalog.drop_duplicates("sha256").itertuples():
        width, height = row.width, row.height
        if pd.notna(width) and pd.notna(height) and min(int(width), int(height)) < tiny_side:
            hints.setdefault(row.sha256, []).append(Hint(f"tiny: {int(width)}×{int(height)}", True))
    clustered = catalog[catalog["cluster"] != ""]
    for _, members in clustered.groupby("cluster", sort=False):
        groups = sorted(set(members["group"].astype(str)))
        if len(groups) > 1:
            for sha in members["sha256"].drop_duplicates():
                hints.setdefault(sha, []).append(Hint(f"cross-group duplicate: {', '.join(groups)}", True))
    if face_rows is not None and len(face_rows):
        counts = _face_hints(workspace, face_rows)
        for sha, hint in counts.items():
            hints.setdefault(sha, []).insert(0, hint)
    return hints


def _face_hints(workspace: Workspace, rows: pd.DataFrame) -> dict[str, Hint]:
    """Face hints per sha256, remembered in review/faces.json (an image's content never changes)."""
    from pipeline_lib.curate import faces

    cache_path = workspace.review / "faces.json"
    try:
        known = json.loads(cache_path.read_text(encoding="utf-8")) if cache_path.is_file() else {}
    except json.JSONDecodeError:
        known = {}
    changed = False
    out: dict[str, Hint] = {}
    for row in rows.drop_duplicates("sha256").itertuples():
        if row.sha256 not in known:
            text, flagged = faces.face_hint(workspace.root / row.path)
            if text == faces.UNAVAILABLE:
                out[row.sha256] = Hint(text, False)
                continue
            known[row.sha256], changed = [text, flagged], True
        text, flagged = known[row.sha256]
        out[row.sha256] = Hint(text, bool(flagged))
    if changed:
        atomic_write_text(cache_path, json.dumps(known))
    return out


THUMBNAIL_MAX_PIXELS = 89_478_485  # the ingest default: a thumbnail never decodes more than ingest would accept


class ThumbnailError(ValueError):
    """An original cannot be made into a thumbnail (too many pixels, unreadable); the message names it."""


def thumbnail_path(workspace: Workspace, sha256: str) -> Path:
    """Where the cached review thumbnail of one image is kept."""
    return workspace.review / "pack" / "thumbs" / f"{sha256}.jpg"


def write_thumbnail(source: Path, target: Path, size: int, max_pixels: int = THUMBNAIL_MAX_PIXELS) -> None:
    """A small JPEG thumbnail of an original (EXIF-rotated, first frame), unless target exists (a cache); written
    atomically under a unique name."""
    if target.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    with _opened_within(source, max_pixels) as image:
        image.draft("RGB", (size, size))  # JPEG: let the decoder scale down (1/2 .. 1/8), never the full image
        thumb = ImageOps.exif_transpose(image.convert("RGB"))
        thumb.thumbnail((size, size))
        with atomic_path(target) as tmp:
            thumb.save(tmp, "JPEG", quality=85)


@contextlib.contextmanager
def _opened_within(source: Path, max_pixels: int) -> Iterator[Image.Image]:
    """The image opened lazily; ThumbnailError if it is unreadable or has more than max_pixels pixels."""
    try:
        image = Image.open(source)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ThumbnailError(f"{source} cannot be read: {error}") from None
    with image:
        width, height = image.size
        if width * height > max_pixels:
            raise ThumbnailError(f"{source} has {width}x{height} pixels, more than {max_pixels}")
        yield image


def write_review_pack(
    workspace: Workspace, catalog: pd.DataFrame, thumbnail_size: int = 160, tiny_side: int = 128
) -> Path:
    """HTML page of images to review (pending first), near-duplicate clusters side by side, and hints.

    Built only when a person will look at it (review.mode require, or `aidetect review pack`); thumbnails are
    cached, so a later pack only makes those of new images. Faces are counted for pending images only (the ones a
    person is asked about).
    """
    pack = workspace.review / "pack"
    considered = catalog[catalog["status"].isin([STATUS_OK, STATUS_PENDING]) | (catalog["cluster"] != "")]
    for row in considered.drop_duplicates("sha256").itertuples():
        try:
            write_thumbnail(workspace.root / row.path, thumbnail_path(workspace, row.sha256), thumbnail_size)
        except ThumbnailError as error:
            log.warning("no thumbnail in the review pack: %s", error)
    hints = review_hints(workspace, considered, considered[considered["status"] == STATUS_PENDING], tiny_side)
    cards = [
        _card(row, hints=hints.get(row.sha256, []))
        for row in considered[considered["status"] != "rejected"].itertuples()
        if row.cluster == ""
    ]
    clusters = [
        _cluster_block(str(key), members, hints)
        for key, members in considered[considered["cluster"] != ""].groupby("cluster", sort=True)
    ]
    page = _PACK_TEMPLATE.format(
        n_pending=int((catalog["status"] == STATUS_PENDING).sum()),
        n_ok=int((catalog["status"] == STATUS_OK).sum()),
        clusters="\n".join(clusters) or "<p>none</p>",
        cards="\n".join(cards),
    )
    return atomic_write_text(pack / "index.html", page)


def _cluster_members(keeper: str, members: pd.DataFrame) -> pd.DataFrame:
    """One row per distinct sha256 of a cluster, the keeper first, the others in catalog order."""
    distinct = members.drop_duplicates("sha256")
    is_keeper = distinct["sha256"] == keeper
    return pd.concat([distinct[is_keeper], distinct[~is_keeper]])


def _cluster_block(keeper: str, members: pd.DataFrame, hints: dict[str, list[Hint]] | None = None) -> str:
    """A near-duplicate cluster: thumbnails side by side, keeper first and marked, cross-group clusters flagged."""
    esc = html.escape
    ordered = _cluster_members(keeper, members)
    groups = sorted(set(ordered["group"].astype(str)))
    cross = len(groups) > 1
    flag = f"<p class='cross-group-flag'>⚠ cross-group cluster: {esc(', '.join(groups))}</p>" if cross else ""
    header = (
        f"<p class='cluster-head'>cluster <code>{esc(keeper[:12])}</code> · {len(ordered)} images · "
        f"groups: {esc(', '.join(groups))}</p>"
    )
    hints = hints or {}
    cards = "".join(
        _card(row, keeper=row.sha256 == keeper, hints=hints.get(row.sha256, [])) for row in ordered.itertuples()
    )
    css = "cluster cross-group" if cross else "cluster"
    return f"<div class='{css}' data-keeper='{esc(keeper)}'>{header}{flag}{cards}</div>"


def safe_href(url: str) -> str:
    """The URL if it is http(s) or file, else "#" (no javascript: links from crawled data)."""
    return url if url.lower().startswith(("http://", "https://", "file://")) else "#"


def hints_html(hints: list[Hint]) -> str:
    """Hints as escaped HTML spans (flagged ones marked)."""
    esc = html.escape
    return "".join(
        f"<span class='hint{' flagged' if hint.flagged else ''}'>{'⚠ ' if hint.flagged else ''}{esc(hint.text)}</span> "
        for hint in hints
    )


def _card(row: object, keeper: bool = False, hints: list[Hint] | None = None) -> str:
    esc = html.escape
    r = row  # itertuples row
    status = str(r.status)
    mark = " <b class='keeper-mark'>keeper</b>" if keeper else ""
    mark += " (duplicate)" if status.startswith("duplicate_of:") else ""
    css = esc(status.split(":")[0]) + (" keeper" if keeper else "")
    return (
        f"<figure class='{css}'><img src='thumbs/{esc(r.sha256)}.jpg' loading='lazy'>"
        f"<figcaption><b>{esc(str(r.label))}</b> · {esc(str(r.group))}{mark}<br>"
        f"{esc(str(r.width))}×{esc(str(r.height))} · {esc(status)}<br>"
        f"<a href='{esc(safe_href(str(r.url)))}'>{esc(str(r.url)[:60])}</a><br><code>{esc(r.sha256[:12])}</code>"
        f"<br>{hints_html(hints or [])}</figcaption></figure>"
    )


_PACK_TEMPLATE = """<!doctype html><html><head><meta charset='utf-8'><title>aidetect review pack</title>
<style>body{{font-family:sans-serif;margin:1em}}figure{{display:inline-block;width:180px;margin:4px;
vertical-align:top;font-size:11px}}figure img{{max-width:170px}}.cluster{{border:2px solid #c60;margin:6px;
padding:4px}}.cross-group{{border-color:#c00;background:#fee}}.cross-group-flag{{color:#c00;font-weight:bold}}
.keeper{{outline:3px solid #090}}.hint{{color:#555}}.flagged{{color:#c00;font-weight:bold}}
.pending_review{{background:#ffd}}.duplicate_of{{opacity:.6}}</style></head><body>
<h1>Review pack</h1><p>{n_pending} pending · {n_ok} approved or undecided</p>
<h2>Near-duplicate clusters</h2><p>Each box is one cluster; the first image is the keeper, the others are
marked duplicate_of it. Red boxes span several groups.</p>{clusters}
<h2>Images</h2>{cards}</body></html>"""


def export_pending(catalog: pd.DataFrame, path: Path) -> int:
    """Write a CSV (sha256,label,group,url,decision,reason) of pending images to fill in; return the count."""
    pending = catalog[catalog["status"] == STATUS_PENDING].drop_duplicates("sha256")
    table = pending[["sha256", "label", "group", "url"]].assign(decision="", reason="")
    table.to_csv(path, index=False)
    return len(table)
