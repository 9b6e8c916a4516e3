"""A small flow (crawl of local folders .. review gate) and helpers shared by the review-gate flow tests."""

from __future__ import annotations

import contextvars
import threading
import time
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect import flow
from prefect.client.orchestration import get_client

from flows import review_gate
from flows.pipeline import _crawl_and_ingest, fingerprint_and_dedup, tracked_stages
from pipeline_lib.core.catalog import read_snapshot
from pipeline_lib.core.config import PipelineConfig
from pipeline_lib.core.config_loader import build_config
from pipeline_lib.core.workspace import Workspace
from pipeline_lib.curate import review
from tests.conftest import make_image


@flow(name="aidetect-review-gate-test")
def gate_flow(config: PipelineConfig) -> dict[str, Any]:
    """The pipeline's data stages up to and including the review gate (no split/training: fast)."""
    with tracked_stages(config, "gate-test", {"aidetect.kind": "test"}) as (workspace, run, tracker):
        _, ingested = _crawl_and_ingest(config, workspace, run)
        deduped = fingerprint_and_dedup(config, workspace, run, ingested)
        approved = review_gate.review_stage(config, workspace, run, deduped)
        statuses = read_snapshot(workspace, approved.catalog)["status"].value_counts().to_dict()
    return {"states": run.states, "statuses": statuses, "mlflow_run_id": tracker.run_id}


def add_images(data: Path, label: str, group: str, seeds: range) -> None:
    """Distinct small images under data/<label>/<group>/."""
    for seed in seeds:
        make_image(data / label / group / f"{seed}.png", seed=seed * 7919 + 13, size=(72, 64), fmt="PNG")


def gate_config(data: Path, root: Path, **review_cfg: Any) -> PipelineConfig:
    folders = [{"path": str(data / label), "label": label} for label in ("real", "ai")]
    mapping = {
        "sources": {"folders": folders},
        "review": {"mode": "require", "port": 0, **review_cfg},
        "execution": {"workspace": str(root)},
        "tracking": {"uri": f"sqlite:///{root.parent / 'mlflow.db'}"},
    }
    return build_config(mapping, origin="test")


# How long a test waits for a flow run to reach the gate or to end: generous, for a machine with load 8 on 2 cores,
# and below pytest's 1800 s per test so that the failure names what was awaited. Nothing here waits for a fixed time.
DEADLINE_S = 1200


def wait_until_paused(workspace: Workspace, timeout: float = DEADLINE_S) -> UUID:
    """The flow run id from review/waiting.json once the API says that run is paused and can be resumed.

    Prefect saves the review form's schema just after the run enters PAUSED, and refuses a resume with input before
    that ("Run input schema not found"): both are waited for, on the server's own records.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = review.read_waiting(workspace) if review.waiting_path(workspace).exists() else None
        if info and resumable(UUID(str(info["flow_run_id"]))):
            return UUID(str(info["flow_run_id"]))
        time.sleep(0.2)
    raise TimeoutError(f"the flow run never reached PAUSED with its review form within {timeout:.0f} s")


def resumable(run_id: UUID) -> bool:
    """Whether the server holds the run as paused (or suspended) with the schema of the input it waits for."""
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(run_id).state
        if state is None or not state.is_paused():
            return False
        keyset = state.state_details.run_input_keyset
        return not keyset or bool(client.filter_flow_run_input(run_id, keyset["schema"], 1, set()))


def finished(thread: threading.Thread, box: dict[str, Any], timeout: float = DEADLINE_S) -> dict[str, Any]:
    """The box of a flow started with in_thread once its thread has ended (AssertionError if it has not in time)."""
    thread.join(timeout)
    assert not thread.is_alive(), f"the flow run did not end within {timeout:.0f} s"
    return box


def in_thread(target: Any, *args: Any) -> tuple[threading.Thread, dict[str, Any]]:
    """Run target in a daemon thread with this thread's Prefect settings; its result or error lands in the dict."""
    box: dict[str, Any] = {}
    context = contextvars.copy_context()

    def body() -> None:
        try:
            box["result"] = context.run(target, *args)
        except BaseException as error:  # noqa: BLE001 - handed to the test
            box["error"] = error

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread, box
