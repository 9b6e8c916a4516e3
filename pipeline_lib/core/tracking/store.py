"""Where the tracking store is, where its UI is, and the experiment runs go to; MLflow kept quiet around calls."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import mlflow
from mlflow import MlflowClient

from pipeline_lib.core.workspace import Workspace

LOCAL_UI_HOST, LOCAL_UI_PORT = "127.0.0.1", 5000  # where `aidetect ui` serves a store that has no server of its own
# The experiment's kind as MLflow 3 records it (set when aidetect creates the experiment, for what reads it).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # the classic training view: runs, metrics, models
# MLflow 3.17's UI ignores that tag: it takes its view from this query parameter of the page's URL, else from the
# browser's last choice (GenAI by default, with traces, token usage and evaluations instead of the runs table).
TRAINING_VIEW_QUERY = "workflowType=machine_learning"


def tracking_uri(uri: str | None, workspace: Workspace) -> str:
    """The configured tracking URI, or the embedded SQLite store inside the workspace."""
    return uri or f"sqlite:///{workspace.root / 'mlflow.db'}"


def is_server(uri: str) -> bool:
    """True if uri is an MLflow tracking server (http/https), which serves its own UI and artifacts."""
    return uri.startswith(("http://", "https://"))


def ui_address(uri: str) -> str:
    """Where the MLflow UI of a tracking URI is: the server itself, or where `aidetect ui` serves a database store."""
    return uri.rstrip("/") if is_server(uri) else f"http://{LOCAL_UI_HOST}:{LOCAL_UI_PORT}"


def experiment_page(ui: str, experiment_id: str | None) -> str:
    """The page of the MLflow UI at ui to open: the experiment's runs table in the training view (stage runs nested
    under their pipeline run), or the list of experiments in that view when there is no experiment yet."""
    path = f"experiments/{experiment_id}/runs" if experiment_id else "experiments"
    return f"{ui.rstrip('/')}/#/{path}?{TRAINING_VIEW_QUERY}"


def find_experiment(uri: str, name: str) -> str | None:
    """Id of the named experiment, or None when there is none (nothing is created)."""
    with quiet():
        experiment = MlflowClient(tracking_uri=uri).get_experiment_by_name(name)
    return None if experiment is None else experiment.experiment_id


def artifact_root(workspace: Workspace) -> str:
    """Where runs of an embedded store keep their artifacts (never the current directory)."""
    path = workspace.root / "mlartifacts"
    path.mkdir(parents=True, exist_ok=True)
    return path.as_uri()


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence MLflow's noisy warnings (pip inference, pydantic) around a call."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@contextlib.contextmanager
def global_uri(uri: str) -> Iterator[None]:
    """Point MLflow's global tracking URI at uri for a block (model URIs models:/m-... resolve through it)."""
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


def ensure_experiment(uri: str, name: str, workspace: Workspace) -> str:
    """Id of the named experiment, in the training view; a new one keeps its artifacts in the workspace, unless a
    tracking server has them."""
    client = MlflowClient(tracking_uri=uri)
    with quiet():
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            location = None if is_server(uri) else artifact_root(workspace)
            tags = {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
            return client.create_experiment(name, artifact_location=location, tags=tags)
        if EXPERIMENT_KIND_TAG not in experiment.tags:  # made by an earlier aidetect (or by hand): keep a user's kind
            client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return experiment.experiment_id
