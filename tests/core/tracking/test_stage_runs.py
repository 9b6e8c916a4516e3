"""The nested run of each stage: real MLflow on SQLite in tmp_path."""

from pipeline_lib.core.tracking.runs import recent_runs, run_summary, start_run
from pipeline_lib.core.tracking.stage_runs import stage_run, stage_runs
from pipeline_lib.core.tracking.store import tracking_uri


def _parent(workspace):
    return start_run(tracking_uri(None, workspace), "exp", workspace, "run", {"aidetect.kind": "pipeline"})


def test_stage_runs_are_finished_children_hidden_from_recent_runs(workspace):
    parent = _parent(workspace)
    parent.set_tags({"prefect.flow_run_id": "flow-1"})
    stage_run(parent, "ingest", "Completed", {"ingest.ok": 3.0, "bad": float("inf")}, 1.5)
    stage_run(parent, "train", "Failed", {}, 0.25, failed=True)
    children = stage_runs(parent)
    assert set(children) == {"ingest", "train"}
    assert children["ingest"]["status"] == "FINISHED" and children["ingest"]["state"] == "Completed"
    assert children["ingest"]["metrics"] == {"ingest.ok": 3.0, "stage.seconds": 1.5}
    assert children["train"]["status"] == "FAILED" and children["train"]["state"] == "Failed"
    summary = run_summary(parent.uri, children["ingest"]["run_id"])
    assert summary["tags"]["mlflow.parentRunId"] == parent.run_id
    assert summary["tags"]["aidetect.kind"] == "stage" and summary["tags"]["prefect.flow_run_id"] == "flow-1"
    assert [r["run_id"] for r in recent_runs(parent.uri, "exp")] == [parent.run_id]


def test_stage_run_spans_the_stage_and_carries_its_epochs(workspace):
    parent = _parent(workspace)
    ended = 1_800_000_000.0  # a fixed end: the run must start 90 s before it
    history = [
        {"epoch": 1, "phase": "head", "train_loss": 0.9, "val_loss": 0.8, "val_accuracy": 0.5},
        {"epoch": 2, "phase": "all", "train_loss": 0.6, "val_loss": 0.7, "val_accuracy": 0.75},
    ]
    child = stage_run(parent, "train", "Completed", {"x": 1.0}, 90.0, ended_at=ended, history=history)
    run = child.client.get_run(child.run_id)
    assert run.info.end_time == 1_800_000_000_000 and run.info.start_time == 1_800_000_000_000 - 90_000
    losses = child.client.get_metric_history(child.run_id, "train.val_loss")
    assert [(m.step, m.value) for m in losses] == [(1, 0.8), (2, 0.7)]
    assert "train.phase" not in run.data.metrics
