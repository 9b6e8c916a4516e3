"""The review gate inside a flow run: pause (interactive) or suspend (deployment) until people decide."""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from uuid import UUID

from prefect import get_run_logger
from prefect.client.orchestration import get_client
from prefect.context import get_run_context
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run, suspend_flow_run
from prefect.input import RunInput

from pipeline_lib.core.catalog import read_snapshot, read_table
from pipeline_lib.core.config import PipelineConfig, ReviewConfig
from pipeline_lib.core.workspace import Workspace
from pipeline_lib.curate import review, review_access
from pipeline_lib.curate import review_server as server
from tasks import stages

log = logging.getLogger(__name__)

PAUSE_KEY = "aidetect-review"
WAITING_MODES = ("require", "assisted")  # the modes whose gate waits for people
POLL_SECONDS = 2  # how often a paused run asks the API whether it was resumed
FORM_REVIEWER = "prefect-form"


class ReviewInput(RunInput):
    """The form shown in the Prefect UI (and sent by the review page / `aidetect review done`)."""

    approve_remaining: bool = False
    note: str = ""


def review_stage(config: PipelineConfig, workspace: Workspace, run: Any, deduped: stages.StageResult) -> Any:
    """Run the review-gate stage; in require or assisted mode with pending images wait for people, then run it again.

    run is the flow's StageRecorder. Images still pending after the wait never reach training: ReviewPending.
    """
    queue = _queue(config, workspace, run, deduped)
    try:
        result = _gate(config, workspace, run, deduped, queue)
    except review.ReviewPending:
        if config.review.mode not in WAITING_MODES:
            raise
    else:
        review.clear_waiting(workspace, str(get_run_context().flow_run.id))  # a resumed suspended run got here
        return result
    catalog = read_snapshot(workspace, deduped.catalog)
    rows = read_table(workspace, queue.catalog) if queue is not None else None
    pending = len(review.undecided(catalog, review.read_decisions(workspace)))
    answer = wait_for_review(config.review, workspace, catalog, pending, rows)
    if answer.approve_remaining:
        marks = server.queue_marks(rows)
        count = len(review.approve_remaining(workspace, catalog, FORM_REVIEWER, note=answer.note, marks=marks))
        get_run_logger().info("approved the %d remaining image(s) (note: %r)", count, answer.note)
    elif answer.note:
        get_run_logger().info("review note: %s", answer.note)
    return _gate(config, workspace, run, deduped, queue)  # the decisions digest changed: recomputed


def _queue(config: PipelineConfig, workspace: Workspace, run: Any, deduped: stages.StageResult) -> Any:
    """The review queue when people will look (require, assisted), else None; every run scores the undecided images
    again (features are cached per image and model, so only new images are embedded)."""
    if config.review.mode not in WAITING_MODES:
        return None
    digest = review.decisions_digest(workspace)
    args = (str(workspace.root), deduped.catalog, digest, config.review, config.tracking, config.train.device)
    return run.run("review-queue", stages.review_queue, *args, cache=False)


def _gate(
    config: PipelineConfig, workspace: Workspace, run: Any, deduped: stages.StageResult, queue: Any = None
) -> Any:
    """The gate keyed by the decisions file; in auto mode the approvals are recorded there first, in assisted mode
    the model's approvals of the images below review.suspicion_threshold."""
    logger = get_run_logger()
    if config.review.mode == "auto":
        recorded = review.record_auto_approvals(workspace, read_snapshot(workspace, deduped.catalog))
        if recorded:
            logger.info("review.mode auto: %d new image(s) approved (reviewer 'auto')", recorded)
    elif config.review.mode == "assisted" and queue is not None and not queue.scorer:
        logger.warning("review.mode assisted behaves as require: %s", queue.why_no_model)
    elif config.review.mode == "assisted" and queue is not None:
        marks = server.queue_marks(read_table(workspace, queue.catalog))
        threshold = config.review.suspicion_threshold
        catalog = read_snapshot(workspace, deduped.catalog)
        recorded = review.record_model_approvals(workspace, catalog, marks, threshold, queue.scorer)
        logger.info(
            "review.mode assisted: %d image(s) below suspicion %g approved by %s", recorded, threshold, queue.scorer
        )
    digest = review.decisions_digest(workspace)
    queue_ref = queue.catalog if queue is not None else None
    return run.run("review", stages.review_gate, str(workspace.root), deduped.catalog, digest, config.review, queue_ref)


def wait_for_review(
    cfg: ReviewConfig, workspace: Workspace, catalog: Any, pending: int, queue: Any = None
) -> ReviewInput:
    """Pause (serving the review page from this process, in the queue's order) or suspend (deployment runs) until
    resumed."""
    logger = get_run_logger()
    flow_run = get_run_context().flow_run
    timeout = max(1, round(cfg.timeout_hours * 3600))
    how = "suspended" if flow_run.deployment_id else "paused"
    review.write_waiting(workspace, str(flow_run.id), how, pending)
    try:
        if flow_run.deployment_id:
            logger.warning(
                "%d image(s) await review; suspending this deployment run (timeout %.1f h). Decide them with "
                "`aidetect review serve --workspace %s`, then resume with `aidetect review done --workspace %s` "
                "or the Prefect UI form.",
                pending, cfg.timeout_hours, workspace.root, workspace.root,
            )  # fmt: skip
            answer = suspend_flow_run(wait_for_input=ReviewInput, timeout=timeout, key=PAUSE_KEY)
        else:
            token = review_access.access_token(cfg.host)
            if token:
                logger.warning(review_access.exposure_warning(cfg.host))
            resumer = page_resumer(flow_run.id)
            app = server.create_app(
                workspace, catalog, resumer, "web", cfg.thumbnail_size, cfg.tiny_side, token, queue=queue,
                threshold=cfg.suspicion_threshold,
            )  # fmt: skip
            with _serving(app, cfg) as base:
                url = review_access.page_url(base, token)
                review.write_waiting(workspace, str(flow_run.id), how, pending, url)
                logger.warning(
                    "%d image(s) await review: open %s , decide them and press 'finish review' "
                    "(or `aidetect review done --workspace %s`, or the Prefect UI form). Waiting up to %.1f h.",
                    pending, url, workspace.root, cfg.timeout_hours,
                )  # fmt: skip
                answer = pause_flow_run(
                    wait_for_input=ReviewInput, timeout=timeout, poll_interval=POLL_SECONDS, key=PAUSE_KEY
                )
    except FlowPauseTimeout:
        review.clear_waiting(workspace, str(flow_run.id))
        left = len(review.undecided(catalog, review.read_decisions(workspace)))
        reason = f"the review gate timed out after {cfg.timeout_hours:g} h (review.timeout_hours)"
        raise review.ReviewPending(review.pending_message(left, workspace, reason)) from None
    review.clear_waiting(workspace, str(flow_run.id))
    return answer if isinstance(answer, ReviewInput) else ReviewInput()


@contextmanager
def _serving(app: Any, cfg: ReviewConfig) -> Iterator[str]:
    """Serve the review page on the configured address, or on a free port if that one is taken."""
    try:
        with server.serve_in_background(app, cfg.host, cfg.port) as url:
            yield url
            return
    except server.ReviewServerError as error:
        if cfg.port == 0:
            raise
        log.warning("%s; using a free port instead", error)
    with server.serve_in_background(app, cfg.host, 0) as url:
        yield url


def resume_run(flow_run_id: UUID | str, approve_remaining: bool = False, note: str = "") -> tuple[bool, str]:
    """Resume a paused/suspended flow run with the review form's input; (accepted, explanation)."""
    run_input = ReviewInput(approve_remaining=approve_remaining, note=note).model_dump(
        include={"approve_remaining", "note"}
    )
    with get_client(sync_client=True) as client:
        result = client.resume_flow_run(UUID(str(flow_run_id)), run_input=run_input)
    status = getattr(result.status, "value", str(result.status))
    if status == "ACCEPT":
        return True, f"flow run {flow_run_id} resumed"
    reason = getattr(result.details, "reason", "") or status
    return False, f"flow run {flow_run_id} was not resumed: {reason}"


def page_resumer(flow_run_id: UUID) -> Callable[[server.FinishIn], server.FinishResult]:
    """The review page's 'finish review': resume this process's paused run (in the flow's Prefect context)."""
    snapshot = contextvars.copy_context()  # the page runs in other threads: keep this run's API settings

    def on_finish(item: server.FinishIn) -> server.FinishResult:
        try:
            accepted, message = snapshot.copy().run(resume_run, flow_run_id, item.approve_remaining, item.note)
        except Exception as error:  # noqa: BLE001 - report to the page, the run keeps waiting
            return server.FinishResult(f"could not resume the run: {error}")
        return server.FinishResult(message + ("; the pipeline continues" if accepted else ""), accepted)

    return on_finish
