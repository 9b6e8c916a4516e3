"""review.mode assisted under prefect_test_harness: the model approves what it does not suspect, the run pauses for
the rest, a person's later decision wins, and the run's MLflow metrics count it all."""

from __future__ import annotations

import json
import urllib.request

import pandas as pd

from flows import review_gate
from pipeline_lib.core.catalog import conform
from pipeline_lib.core.tracking.runs import run_summary
from pipeline_lib.core.workspace import Workspace
from pipeline_lib.curate import review
from pipeline_lib.ops.status import latest_snapshot
from tests.assess.test_review_scorer import register_champion
from tests.flows.gate_helpers import finished, gate_config, gate_flow, in_thread, wait_until_paused
from tests.flows.test_review_gate import _data, _decisions


def _shas(workspace: Workspace) -> dict[str, list[str]]:
    catalog = conform(pd.read_parquet(latest_snapshot(workspace, "dedup")))
    return {label: sorted(catalog.loc[catalog["label"] == label, "sha256"]) for label in ("real", "ai")}


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def test_assisted_mode_pauses_only_for_suspects_records_who_approved_and_a_person_overrides(harness, tmp_path):
    root = tmp_path / "ws"
    workspace = Workspace.create(root)
    # tiny_side below the test images; a threshold above "no face found" (0.25) so that only the model's doubt counts
    config = gate_config(_data(tmp_path), root, mode="assisted", suspicion_threshold=0.4, tiny_side=16)
    version = register_champion(workspace, config.tracking.uri, config.tracking.registered_model)  # says "ai" always
    model = f"model:{config.tracking.registered_model}/{version}"
    thread, box = in_thread(gate_flow, config)
    run_id = wait_until_paused(workspace)
    shas = _shas(workspace)
    by_model = _decisions(workspace)
    assert {line["sha256"] for line in by_model} == set(shas["ai"]), "the model approves what it does not suspect"
    assert {line["reviewer"] for line in by_model} == {model} and all(line["score"] < 0.4 for line in by_model)
    waiting = review.read_waiting(workspace)
    assert waiting["pending"] == 2, "the run waits only for the two suspects (real images the model calls ai)"

    # On the page: approve one suspect (overturning the model), reject the other, reject one the model approved.
    url = str(waiting["url"]).split("?")[0] + "api/decisions"
    _post(url, {"sha256": shas["real"][0], "decision": "approve"})
    _post(url, {"sha256": shas["real"][1], "decision": "reject", "reason": "wrong_label"})
    _post(url, {"sha256": shas["ai"][0], "decision": "reject", "reason": "unrelated"})
    accepted, message = review_gate.resume_run(run_id)
    assert accepted, message
    result = finished(thread, box)
    assert "error" not in result, result.get("error")
    result = result["result"]
    assert result["states"]["review-queue"] == "Completed" and result["states"]["review"] == "Completed"
    assert result["statuses"] == {"ok": 2, "rejected": 2}, result["statuses"]
    latest = review.read_decisions(workspace)
    assert latest[shas["ai"][0]].reviewer == "web" and latest[shas["ai"][0]].decision == "reject", "the person wins"
    assert latest[shas["ai"][1]].reviewer == model
    person = latest[shas["real"][0]]
    assert (person.suggested, person.decision) == ("reject", "approve") and person.score > 0.9
    metrics = run_summary(config.tracking.uri, result["mlflow_run_id"])["metrics"]
    counts = {
        name: metrics[f"review.{name}"]
        for name in ("pending", "suspects_shown", "rejected", "approved_by_model", "model_suspects_overturned")
    }
    assert counts == {
        "pending": 4,
        "suspects_shown": 2,
        "rejected": 2,
        "approved_by_model": 1,
        "model_suspects_overturned": 1,
    }, counts


def test_assisted_mode_without_a_model_behaves_as_require_and_says_why(harness, tmp_path, caplog):
    root = tmp_path / "ws"
    workspace = Workspace.create(root)
    config = gate_config(_data(tmp_path), root, mode="assisted", tiny_side=16)
    thread, box = in_thread(gate_flow, config)
    run_id = wait_until_paused(workspace)
    assert review.read_waiting(workspace)["pending"] == 4 and not review.decisions_path(workspace).exists()
    assert "review.mode assisted behaves as require: no champion and no trained model" in caplog.text
    assert review_gate.resume_run(run_id, approve_remaining=True)[0]
    result = finished(thread, box)
    assert "error" not in result, result.get("error")
    assert result["result"]["statuses"] == {"ok": 4}
    assert {line["reviewer"] for line in _decisions(workspace)} == {review_gate.FORM_REVIEWER}
