"""The review gate under prefect_test_harness: pause + resume with input, timeout, suspend + resume (deployment)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from fastapi.testclient import TestClient
from prefect.client.orchestration import get_client
from prefect.exceptions import Pause
from prefect.flow_engine import run_flow
from typer.testing import CliRunner

from flows import review_gate
from flows.cli import app
from pipeline_lib.core.catalog import conform
from pipeline_lib.core.workspace import Workspace
from pipeline_lib.curate import review, review_server
from pipeline_lib.ops.status import latest_snapshot
from tests.flows.gate_helpers import add_images, finished, gate_config, gate_flow, in_thread, wait_until_paused

UPSTREAM = ["crawl", "ingest", "fingerprint", "dedup"]


def _data(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    add_images(data, "real", "anna", range(0, 2))
    add_images(data, "ai", "sd-1", range(10, 12))
    return data


def _decisions(workspace: Workspace) -> list[dict]:
    path = review.decisions_path(workspace)
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_pause_then_resume_with_input_approves_the_rest(harness, tmp_path):
    data, root = _data(tmp_path), tmp_path / "ws"
    workspace = Workspace.create(root)
    config = gate_config(data, root)
    thread, box = in_thread(gate_flow, config)
    run_id = wait_until_paused(workspace)
    # Someone rejects one image on the page, then the run is resumed through the Prefect API with the form's input.
    pending = review.undecided(_dedup_catalog(workspace), {})
    assert (workspace.review / "pack" / "index.html").is_file(), "require mode: a person looks, the pack is built"
    first = pending["sha256"].iloc[0]
    review.append_decisions(workspace, [review.Decision(first, "reject", "unrelated", "me")])
    accepted, message = review_gate.resume_run(run_id, approve_remaining=True, note="checked")
    assert accepted, message
    box = finished(thread, box)
    assert "error" not in box, box.get("error")
    result = box["result"]
    assert [result["states"][s] for s in UPSTREAM] == ["Completed"] * 4
    assert result["states"]["review"] == "Completed"
    assert result["statuses"].get("rejected") == 1 and "pending_review" not in result["statuses"]
    lines = _decisions(workspace)
    assert lines[0]["reviewer"] == "me" and {line["reviewer"] for line in lines[1:]} == {"prefect-form"}
    assert len(lines) == len(pending), "one decision per pending image, the rejected one not overruled"
    assert review.read_decisions(workspace)[first].decision == "reject"
    assert not review.waiting_path(workspace).exists()
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(run_id).state.is_completed()

    # A re-crawl with one new image asks only about that one; the rejected image stays rejected.
    add_images(data, "real", "anna", range(5, 6))
    thread, box = in_thread(gate_flow, config)
    wait_until_paused(workspace)
    todo = review.undecided(_dedup_catalog(workspace), review.read_decisions(workspace))
    assert len(todo) == 1 and todo["path"].iloc[0] != ""
    assert json.loads(review.waiting_path(workspace).read_text())["pending"] == 1
    review.append_decisions(workspace, [review.Decision(todo["sha256"].iloc[0], "approve", "", "me")])
    done = CliRunner().invoke(app, ["review", "done", "--workspace", str(root)])  # the CLI resumes the waiting run
    assert done.exit_code == 0 and "resumed" in done.stdout, done.output
    box = finished(thread, box)
    assert "error" not in box, box.get("error")
    assert box["result"]["statuses"].get("rejected") == 1 and "pending_review" not in box["result"]["statuses"]


def _dedup_catalog(workspace: Workspace) -> pd.DataFrame:
    return conform(pd.read_parquet(latest_snapshot(workspace, "dedup")))


def test_pause_timeout_ends_the_run_with_how_to_continue(harness, tmp_path, caplog):
    root = tmp_path / "ws"
    # The gate's shortest timeout (1 s) is what this test waits for: nothing races it (nobody resumes the run), so
    # a busy machine can only make it end later, and the run's end is awaited, not timed.
    config = gate_config(_data(tmp_path), root, timeout_hours=1 / 3600)
    state = gate_flow(config, return_state=True)
    # Prefect's server fails a run whose pause expired ("never resumed"); the gate's ReviewPending explains more.
    assert state.is_failed(), state
    text = caplog.text
    assert "ReviewPending" in text and "timed out after" in text, text[-2000:]
    assert "aidetect review serve" in text and "aidetect run" in text
    workspace = Workspace.open(root)
    assert _decisions(workspace) == [] and not review.waiting_path(workspace).exists()


def test_resuming_without_decisions_keeps_images_from_training(harness, tmp_path):
    root = tmp_path / "ws"
    workspace = Workspace.create(root)
    thread, box = in_thread(gate_flow, gate_config(_data(tmp_path), root))
    run_id = wait_until_paused(workspace)
    assert review_gate.resume_run(run_id, note="later")[0]
    box = finished(thread, box)
    assert isinstance(box.get("error"), review.ReviewPending), box
    assert "aidetect review serve" in str(box["error"])
    assert _decisions(workspace) == []


def test_deployment_run_suspends_and_resumes_with_upstream_cached(harness, tmp_path):
    root = tmp_path / "ws"
    workspace = Workspace.create(root)
    config = gate_config(_data(tmp_path), root)
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow(gate_flow)
        deployment_id = client.create_deployment(flow_id=flow_id, name="review-gate-test")
        flow_run = client.create_flow_run_from_deployment(
            deployment_id, parameters={"config": config.model_dump(mode="json")}
        )
    with pytest.raises(Pause):  # the process gives the run up; a worker reruns it after the resume
        run_flow(gate_flow, flow_run=flow_run, parameters={"config": config})
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(flow_run.id).state
    assert state.is_paused() and state.name == "Suspended", state
    waiting = review.read_waiting(workspace)
    assert waiting["how"] == "suspended" and waiting["flow_run_id"] == str(flow_run.id)

    # Decide one image by hand, resume from "another shell" with approve_remaining, and let the "worker" rerun it.
    catalog = _dedup_catalog(workspace)
    first = review.undecided(catalog, {})["sha256"].iloc[0]
    review.append_decisions(workspace, [review.Decision(first, "reject", "several_people", "me")])
    accepted, message = review_gate.resume_run(flow_run.id, approve_remaining=True)
    assert accepted, message
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run.id)
    result = run_flow(gate_flow, flow_run=flow_run, parameters={"config": config})
    # the crawl runs whenever asked (and finds nothing new); the stages after it come back Cached
    assert [result["states"][s] for s in UPSTREAM] == ["Completed", "Cached", "Cached", "Cached"], result["states"]
    assert result["states"]["review"] == "Completed"
    assert result["statuses"].get("rejected") == 1 and "pending_review" not in result["statuses"]
    assert {line["reviewer"] for line in _decisions(workspace)} == {"me", "prefect-form"}
    assert not review.waiting_path(workspace).exists()


@pytest.mark.parametrize("mode", ["auto", "off"])
def test_auto_and_off_never_wait_and_build_no_pack_yet_review_serve_shows_thumbnails(harness, tmp_path, mode):
    root = tmp_path / "ws"
    result = gate_flow(gate_config(_data(tmp_path), root, mode=mode))
    assert result["states"]["review"] == "Completed" and result["statuses"] == {"ok": 4}
    workspace = Workspace.open(root)
    assert not review.waiting_path(workspace).exists()
    assert not (workspace.review / "pack").exists(), "nobody looks at a pack in auto/off mode: none is built"
    # `aidetect review serve` on the same workspace: thumbnails are made on demand, then kept
    catalog = pd.read_parquet(latest_snapshot(workspace, "dedup"))
    client = TestClient(review_server.create_app(workspace, catalog))
    sha = catalog["sha256"].iloc[0]
    if mode == "auto":  # every image was approved (reviewer auto): none is listed as undecided on the page
        assert {line["reviewer"] for line in _decisions(workspace)} == {"auto"}
    else:
        assert f"thumbs/{sha}.jpg" in client.get("/").text
    response = client.get(f"/thumbs/{sha}.jpg")
    assert response.status_code == 200 and response.content[:2] == b"\xff\xd8"
    assert review.thumbnail_path(workspace, sha).read_bytes() == response.content
    assert [p.name for p in review.thumbnail_path(workspace, sha).parent.iterdir()] == [f"{sha}.jpg"]
