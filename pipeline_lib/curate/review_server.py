"""The review page's server: a FastAPI app that appends decisions to review/decisions.jsonl, and serving it.

Who may use it is review_access (RequestGuard); what it shows is review_page (plain HTML/JS, no build step).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import pandas as pd
import uvicorn
from fastapi import FastAPI, HTTPException
from fastapi.responses import FileResponse, HTMLResponse
from pydantic import BaseModel, Field

from pipeline_lib.core.catalog import INVALID_PREFIX, STATUS_OK, STATUS_PENDING
from pipeline_lib.core.workspace import Workspace
from pipeline_lib.curate import review, review_pack
from pipeline_lib.curate.review_access import RequestGuard
from pipeline_lib.curate.review_page import render_page

log = logging.getLogger(__name__)


class DecisionIn(BaseModel):
    """One decision posted by the page."""

    sha256: str = Field(min_length=1, max_length=128)
    decision: Literal["approve", "reject"]
    reason: Literal["", "duplicate", "several_people", "unrelated", "wrong_label", "other"] = ""


class GroupIn(BaseModel):
    group: str


class BelowIn(BaseModel):
    """'approve every remaining image below suspicion X'."""

    threshold: float = Field(ge=0, le=1)


class FinishIn(BaseModel):
    """The same fields as the flow's RunInput form."""

    approve_remaining: bool = False
    note: str = Field("", max_length=2000)


@dataclass(frozen=True)
class FinishResult:
    """What on_finish reports back to the page."""

    message: str
    resumed: bool = False


OnFinish = Callable[[FinishIn], FinishResult]


class ReviewServerError(RuntimeError):
    """The review page could not be served (e.g. the port is taken)."""


def thumbnail_paths(catalog: pd.DataFrame, todo: pd.DataFrame, decided: set[str]) -> dict[str, str]:
    """sha256 -> stored path of the images the page may show: pending, decided, and the near-duplicates shown
    beside pending ones; never a quarantined (invalid) file."""
    valid = catalog[~catalog["status"].astype(str).str.startswith(INVALID_PREFIX)]
    valid = valid[valid["path"].astype(str).str.startswith("store/")]
    clusters = set(todo["cluster"].astype(str)) - {""}
    shown = valid["sha256"].isin(set(todo["sha256"]) | decided) | valid["cluster"].isin(clusters)
    return dict(zip(valid[shown]["sha256"], valid[shown]["path"], strict=True))


def create_app(
    workspace: Workspace,
    catalog: pd.DataFrame,
    on_finish: OnFinish | None = None,
    reviewer: str = "web",
    thumbnail_size: int = 160,
    tiny_side: int = 128,
    token: str | None = None,
    allowed_hosts: tuple[str, ...] = (),
    max_pixels: int = review_pack.THUMBNAIL_MAX_PIXELS,
    queue: pd.DataFrame | None = None,
    threshold: float = 0.5,
) -> FastAPI:
    """The review app for the images of catalog that are undecided now (ok/pending rows without a decision).

    token: required on every request when set (see access_token: the page listens beyond loopback);
    allowed_hosts: extra Host names to answer for (e.g. a reverse proxy's name);
    queue: the review queue's rows (assess.review_queue): the page shows its order, reasons and suggestions, and
    every decision made here records the image's suspicion and the suggestion; threshold: where suspects end.
    """
    candidates = catalog[catalog["status"].isin([STATUS_OK, STATUS_PENDING])].drop_duplicates("sha256")
    decided_before = review.read_decisions(workspace)
    todo = review.undecided(candidates, decided_before)
    known = set(candidates["sha256"])
    todo_shas = list(todo["sha256"])
    paths = thumbnail_paths(catalog, todo, set(decided_before) & set(catalog["sha256"]))
    review_pack.thumbnails_made_now(workspace, thumbnail_size)
    marks = queue_marks(queue)
    hints = {} if marks else review_pack.review_hints(workspace, catalog, todo, tiny_side)  # the queue has them
    lock = threading.Lock()
    finished: dict[str, object] = {}
    app = FastAPI(title="aidetect review", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(RequestGuard, token=token, extra_hosts=frozenset(h.lower() for h in allowed_hosts))

    def progress() -> dict[str, int]:
        decided = review.read_decisions(workspace)
        return {"decided": sum(sha in decided for sha in todo_shas), "total": len(todo_shas)}

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        decided = review.read_decisions(workspace)
        waiting = review.read_waiting(workspace) is not None
        return render_page(catalog, todo, decided, hints, progress(), waiting, queue, threshold)

    @app.get("/api/progress")
    def get_progress() -> dict[str, object]:
        return progress() | {"finished": bool(finished)}

    @app.get("/thumbs/{name}")
    def thumb(name: str) -> FileResponse:
        sha = name.removesuffix(".jpg")
        if sha not in paths:
            raise HTTPException(404, f"no image with sha256 {sha!r} is shown on this page")
        target = review.thumbnail_path(workspace, sha)  # made on first request, then cached
        try:
            review_pack.write_thumbnail(workspace.root / str(paths[sha]), target, thumbnail_size, max_pixels)
        except review_pack.ThumbnailError as error:
            raise HTTPException(422, str(error)) from None
        return FileResponse(target, media_type="image/jpeg")

    @app.post("/api/decisions")
    def decide(item: DecisionIn) -> dict[str, object]:
        if item.sha256 not in known:
            raise HTTPException(404, f"no image with sha256 {item.sha256!r} awaits review here")
        if item.decision == "approve" and item.reason:
            raise HTTPException(422, "an approve decision takes no reason")
        with lock:
            decision = review.Decision(item.sha256, item.decision, item.reason, reviewer)
            review.append_decisions(workspace, [review.marked(decision, marks)], known)
        return progress() | {"sha256": item.sha256, "decision": item.decision, "reason": item.reason}

    @app.post("/api/approve-rest")
    def approve_rest(item: GroupIn) -> dict[str, object]:
        if item.group not in set(todo["group"]):
            raise HTTPException(404, f"no group {item.group!r} among the images to review")
        with lock:
            approved = review.approve_remaining(workspace, todo, reviewer, group=item.group, marks=marks)
        return progress() | {"approved": approved}

    @app.post("/api/approve-below")
    def approve_below(item: BelowIn) -> dict[str, object]:
        if not marks:
            raise HTTPException(409, "this page shows no review queue: there is no suspicion to approve below")
        with lock:
            approved = review.approve_remaining(workspace, todo, reviewer, marks=marks, below=item.threshold)
        log.info("review page: %d image(s) below suspicion %g approved by %s", len(approved), item.threshold, reviewer)
        return progress() | {"approved": approved}

    @app.post("/api/finish")
    def finish(item: FinishIn) -> dict[str, object]:
        with lock:
            if item.approve_remaining:
                review.approve_remaining(workspace, todo, reviewer, note=item.note, marks=marks)
            state = progress()
            left = state["total"] - state["decided"]
            if on_finish is not None:
                result = on_finish(item)
            else:
                result = FinishResult(
                    f"decisions saved ({left} still undecided); run `aidetect run --workspace {workspace.root}` "
                    "again to continue (stages before the gate come back Cached)"
                )
            finished.update(message=result.message, resumed=result.resumed)
        log.info("review finished: %s", result.message)
        return state | {"message": result.message, "resumed": result.resumed}

    return app


def queue_marks(queue: pd.DataFrame | None) -> dict[str, review.Mark]:
    """sha256 -> the queue's suspicion and suggestion (empty without a queue)."""
    if queue is None or queue.empty:
        return {}
    return {
        str(sha): review.Mark(float(score), str(suggested))
        for sha, score, suggested in zip(queue["sha256"], queue["suspicion"], queue["suggested"], strict=True)
    }


@contextmanager
def serve_in_background(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve app from a daemon thread while the block runs; yield its base URL; stop on exit."""
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, name="aidetect-review-page", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise ReviewServerError(f"cannot serve the review page on {host}:{port} (port taken or not allowed?)")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    try:
        yield f"http://{shown}:{bound}/"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def serve_forever(app: FastAPI, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Serve app in the foreground until interrupted (for `aidetect review serve`)."""
    uvicorn.run(app, host=host, port=port, log_level="warning")
