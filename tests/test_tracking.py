"""Real MLflow on SQLite in tmp_path."""

import numpy as np
import pandas as pd
import torch
from torch import nn

from pipeline_lib import tracking


def _tracker(workspace):
    uri = tracking.tracking_uri(None, workspace)
    return tracking.start_run(uri, "exp", workspace, "run", {"aidetect.kind": "pipeline"})


def test_embedded_store_lives_in_the_workspace(workspace):
    tracker = _tracker(workspace)
    assert tracker.uri == f"sqlite:///{workspace.root / 'mlflow.db'}"
    tracker.log_text("hi", "notes/a.txt")
    assert list((workspace.root / "mlartifacts").rglob("a.txt")), "artifacts must land inside the workspace"


def test_params_metrics_tags_datasets_round_trip(workspace):
    tracker = _tracker(workspace)
    tracker.log_params({"train.lr": 0.1})
    tracker.log_metrics({"acc": 0.9, "nan_metric": float("nan")})
    tracker.log_metrics({"loss": 1.0}, step=1)
    tracker.set_tags({"prefect.flow_run_id": "abc"})
    frame = pd.DataFrame({"sha256": ["x"], "label": ["ai"]})
    tracker.log_dataset(frame, "catalog-test", "d" * 16, "catalog/split-x.parquet", "test")
    tracker.finish()
    summary = tracking.run_summary(tracker.uri, tracker.run_id)
    assert summary["params"]["train.lr"] == "0.1"
    assert summary["metrics"]["acc"] == 0.9 and "nan_metric" not in summary["metrics"]
    assert summary["tags"]["prefect.flow_run_id"] == "abc"
    assert summary["datasets"] == [("catalog-test", "d" * 16)]
    assert summary["status"] == "FINISHED"
    assert tracking.recent_runs(tracker.uri, "exp")[0]["run_id"] == tracker.run_id


def test_champion_moves_only_on_improvement(workspace):
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    example = np.random.rand(1, 3, 4, 4).astype("float32")
    decisions = []
    for score in (0.8, 0.7, 0.9):
        tracker = _tracker(workspace)
        uri = tracking.log_pytorch_model(tracker, model, example, ["torch"])
        decisions.append(tracking.register_model(tracker, uri, "det", score, "testdigest", f"m{score}"))
    assert [d.promoted for d in decisions] == [True, False, True], [d.reason for d in decisions]
    champion = tracking.current_champion(tracker.uri, "det")
    assert str(champion.version) == decisions[2].version
    assert str(tracking.find_version(tracker.uri, "det", "m0.7").version) == decisions[1].version
    # A champion scored on another test split is not compared blindly.
    other = tracking.register_model(tracker, uri, "det", 0.99, "othertest", "m-other")
    assert not other.promoted and "another test split" in other.reason
    import mlflow.pytorch

    mlflow.set_tracking_uri(tracker.uri)
    loaded = mlflow.pytorch.load_model(uri)
    assert loaded(torch.rand(5, 3, 4, 4)).shape == (5, 2), "pickled model must accept any batch size"
