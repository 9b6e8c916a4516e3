"""The review pack: thumbnails of the originals, hints that speed up the clean-up, and review/pack/index.html."""

from __future__ import annotations

import contextlib
import html
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from PIL import Image, ImageOps

from pipeline_lib.core.catalog import STATUS_OK, STATUS_PENDING
from pipeline_lib.core.code_index import producer_code
from pipeline_lib.core.workspace import Workspace, atomic_path, atomic_write_text
from pipeline_lib.curate import faces
from pipeline_lib.curate.review import thumbnail_folder, thumbnail_path

log = logging.getLogger(__name__)

FACE_PRODUCERS = (faces.face_hint,)  # what makes a face hint: its digest names the hints' file


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
        counts = face_hints(workspace, face_rows)
        for sha, hint in counts.items():
            hints.setdefault(sha, []).insert(0, hint)
    return hints


def faces_path(workspace: Workspace) -> Path:
    """Where the face hints made by the current face-counting code are remembered: review/faces-<code>.json."""
    return workspace.review / f"faces-{producer_code(*FACE_PRODUCERS)}.json"


def face_hints(workspace: Workspace, rows: pd.DataFrame) -> dict[str, Hint]:
    """Face hints per sha256, remembered in faces_path (an image's content never changes; a change of the face
    counting code counts again)."""
    cache_path = faces_path(workspace)
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


THUMBNAIL_PRODUCERS = (write_thumbnail,)  # what makes a review thumbnail (thumbnails_made_now)


def thumbnails_made_now(workspace: Workspace, size: int) -> None:
    """Empty the thumbnail folder if other code or another size made its thumbnails; review/pack/thumbs.made_by names
    the size and the digest of write_thumbnail (and what it reaches) of those inside. Call before making any."""
    marker = workspace.review / "pack" / "thumbs.made_by"
    made_by = f"{size}-{producer_code(*THUMBNAIL_PRODUCERS)}"
    if marker.is_file() and marker.read_text(encoding="utf-8").strip() == made_by:
        return
    stale = sorted(thumbnail_folder(workspace).glob("*.jpg"))
    for old in stale:
        old.unlink(missing_ok=True)
    atomic_write_text(marker, made_by + "\n")
    if stale:
        log.info("review thumbnails: %d made by other code or at another size removed", len(stale))


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
    thumbnails_made_now(workspace, thumbnail_size)
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
