"""Where the store is and the experiment runs go to: real MLflow on SQLite in tmp_path."""

from mlflow import MlflowClient

from pipeline_lib.core.tracking.runs import start_run
from pipeline_lib.core.tracking.store import EXPERIMENT_KIND_TAG, ensure_experiment, tracking_uri


def test_embedded_store_lives_in_the_workspace(workspace):
    tracker = start_run(tracking_uri(None, workspace), "exp", workspace, "run", {"aidetect.kind": "pipeline"})
    assert tracker.uri == f"sqlite:///{workspace.root / 'mlflow.db'}"
    tracker.log_text("hi", "notes/a.txt")
    assert list((workspace.root / "mlartifacts").rglob("a.txt")), "artifacts must land inside the workspace"


def test_experiment_opens_in_the_training_view(workspace):
    uri = tracking_uri(None, workspace)
    experiment_id = ensure_experiment(uri, "views", workspace)
    tags = MlflowClient(tracking_uri=uri).get_experiment(experiment_id).tags
    assert tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    older = MlflowClient(tracking_uri=uri).create_experiment("older")  # made before aidetect tagged experiments
    assert ensure_experiment(uri, "older", workspace) == older
    assert MlflowClient(tracking_uri=uri).get_experiment(older).tags[EXPERIMENT_KIND_TAG] == (
        "custom_model_development"
    )
