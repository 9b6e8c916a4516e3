"""One run's params, metrics, tags, datasets and owner: real MLflow on SQLite in tmp_path."""

import pandas as pd

from pipeline_lib.core.tracking.runs import (
    WORKSPACE_TAG,
    end_orphaned_runs,
    owner_tags,
    recent_runs,
    run_summary,
    start_run,
)
from pipeline_lib.core.tracking.store import tracking_uri


def test_params_metrics_tags_datasets_round_trip(workspace):
    tracker = start_run(tracking_uri(None, workspace), "exp", workspace, "run", {"aidetect.kind": "pipeline"})
    tracker.log_params({"train.lr": 0.1})
    tracker.log_metrics({"acc": 0.9, "nan_metric": float("nan")})
    tracker.log_metrics({"loss": 1.0}, step=1)
    tracker.set_tags({"prefect.flow_run_id": "abc"})
    frame = pd.DataFrame({"sha256": ["x"], "label": ["ai"]})
    tracker.log_dataset(frame, "catalog-test", "d" * 16, "catalog/split-x.parquet", "test")
    tracker.finish()
    summary = run_summary(tracker.uri, tracker.run_id)
    assert summary["params"]["train.lr"] == "0.1"
    assert summary["metrics"]["acc"] == 0.9 and "nan_metric" not in summary["metrics"]
    assert summary["tags"]["prefect.flow_run_id"] == "abc"
    assert summary["datasets"] == [("catalog-test", "d" * 16)]
    assert summary["status"] == "FINISHED"
    assert recent_runs(tracker.uri, "exp")[0]["run_id"] == tracker.run_id


def test_a_run_left_running_by_a_killed_process_is_marked_killed(workspace):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    uri = tracking_uri(None, workspace)
    owner = owner_tags(workspace)
    orphan = start_run(uri, "exp", workspace, "killed", owner | {"aidetect.pid": dead.stdout.strip()})
    mine = start_run(uri, "exp", workspace, "this one", owner)
    elsewhere = start_run(uri, "exp", workspace, "other ws", owner | {WORKSPACE_TAG: "/other/ws"})
    assert end_orphaned_runs(uri, "exp", workspace) == [orphan.run_id]
    status = {t.run_id: run_summary(uri, t.run_id)["status"] for t in (orphan, mine, elsewhere)}
    assert status == {orphan.run_id: "KILLED", mine.run_id: "RUNNING", elsewhere.run_id: "RUNNING"}
    assert end_orphaned_runs(uri, "no-such-experiment", workspace) == []
