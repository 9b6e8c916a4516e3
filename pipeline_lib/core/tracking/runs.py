"""One MLflow run: a Tracker that logs to it by id, starting and ending runs, reading them back."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException

from pipeline_lib.core.tracking.store import TRAINING_VIEW_QUERY, ensure_experiment, is_server, quiet, ui_address
from pipeline_lib.core.workspace import Workspace

log = logging.getLogger(__name__)

WORKSPACE_TAG = "aidetect.workspace"  # the workspace a run wrote to (with aidetect.host and aidetect.pid)
CATALOG_ARTIFACTS = "catalog"  # where a pipeline run keeps the split catalog snapshot its model was trained on


@dataclass(frozen=True)
class Tracker:
    """A handle on one MLflow run: every method logs to that run by id (thread-safe)."""

    uri: str
    run_id: str

    @property
    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.uri)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params (values truncated to MLflow's 6000-char limit)."""
        items = [mlflow.entities.Param(str(k), str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log finite numeric metrics; NaN and inf are skipped with a debug line."""
        rows = metric_rows(metrics, step)
        for start in range(0, len(rows), 500):
            self.client.log_batch(self.run_id, metrics=rows[start : start + 500])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags."""
        for key, value in tags.items():
            self.client.set_tag(self.run_id, str(key), str(value))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Upload a file or a whole folder as artifacts of the run."""
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        """Log a text artifact."""
        self.client.log_text(self.run_id, text, artifact_file)

    def log_table(self, frame: pd.DataFrame, artifact_file: str) -> None:
        """Log a DataFrame as a JSON table artifact (shown as a table in the MLflow UI)."""
        self.client.log_table(self.run_id, frame, artifact_file)

    def log_dataset(self, frame: pd.DataFrame, name: str, digest: str, source: str, context: str) -> None:
        """Record a catalog table as a dataset input of the run, with its content digest."""
        with quiet():
            dataset = mlflow.data.from_pandas(frame, source=source, name=name, digest=digest[:36], targets="label")
            dataset_input = mlflow.entities.DatasetInput(
                dataset._to_mlflow_entity(), tags=[mlflow.entities.InputTag("mlflow.data.context", context)]
            )
            self.client.log_inputs(self.run_id, datasets=[dataset_input])

    def finish(self, status: str = "FINISHED") -> None:
        """End the run with FINISHED, FAILED or KILLED."""
        self.client.set_terminated(self.run_id, status=RunStatus.to_string(RunStatus.from_string(status)))

    def run_url(self) -> str:
        """A link to the run in the MLflow UI's training view (relative to the UI's address for embedded stores)."""
        run = self.client.get_run(self.run_id)
        return f"#/experiments/{run.info.experiment_id}/runs/{self.run_id}?{TRAINING_VIEW_QUERY}"

    def ui_link(self) -> tuple[str, str]:
        """(URL of the run in the MLflow UI of this tracking URI, link text saying whether `aidetect ui` must run)."""
        url = f"{ui_address(self.uri)}/{self.run_url()}"
        return url, "MLflow run" if is_server(self.uri) else "MLflow run (after `aidetect ui`)"


def metric_rows(metrics: Mapping[str, float], step: int | None = None) -> list[Any]:
    """MLflow Metric entities of the finite values (NaN and inf are skipped with a debug line)."""
    rows = []
    for key, value in metrics.items():
        if value is None or not math.isfinite(float(value)):
            log.debug("metric %s=%r not logged (not finite)", key, value)
            continue
        rows.append(mlflow.entities.Metric(str(key), float(value), _now_ms(), step or 0))
    return rows


def _now_ms() -> int:
    return int(time.time() * 1000)


def epoch_metrics(row: Mapping[str, Any]) -> dict[str, float]:
    """One epoch's numbers as train.* metrics (the phase and other text left out)."""
    return {
        f"train.{key}": float(value)
        for key, value in row.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }


def start_run(
    uri: str,
    experiment: str,
    workspace: Workspace,
    run_name: str,
    tags: Mapping[str, str] | None = None,
    parent_run_id: str | None = None,
) -> Tracker:
    """Create a run (nested under parent_run_id if given) and return a Tracker for it."""
    experiment_id = ensure_experiment(uri, experiment, workspace)
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    with quiet():
        run = MlflowClient(tracking_uri=uri).create_run(experiment_id, run_name=run_name, tags=all_tags)
    return Tracker(uri, run.info.run_id)


def owner_tags(workspace: Workspace) -> dict[str, str]:
    """Tags naming who runs a pipeline run: workspace, host and pid (to find runs a killed process left RUNNING)."""
    import os
    import socket

    return {WORKSPACE_TAG: str(workspace.root), "aidetect.host": socket.gethostname(), "aidetect.pid": str(os.getpid())}


def end_orphaned_runs(uri: str, experiment: str, workspace: Workspace) -> list[str]:
    """Mark KILLED the RUNNING runs of this workspace left by a process that no longer runs; their ids.

    Call it holding the workspace lock: no other live process of this host writes to the workspace then, so a
    RUNNING run of it from another pid is one whose process died (a SIGKILL, a power cut) before it could end it.
    """
    import os
    import socket

    running = f"attributes.status = 'RUNNING' and tags.`{WORKSPACE_TAG}` = '{workspace.root}'"
    runs = _search_runs(uri, experiment, running)
    client = MlflowClient(tracking_uri=uri)
    ended = []
    for run in runs:
        tags = run.data.tags
        if tags.get("aidetect.host") != socket.gethostname() or tags.get("aidetect.pid") == str(os.getpid()):
            continue
        client.set_terminated(run.info.run_id, status="KILLED")
        pid = tags.get("aidetect.pid")
        log.warning("MLflow run %s was left RUNNING by pid %s, which died: marked KILLED", run.info.run_id, pid)
        ended.append(run.info.run_id)
    return ended


@contextlib.contextmanager
def system_metrics(tracker: Tracker, interval_s: float) -> Iterator[None]:
    """Sample CPU, memory, disk and GPU use into the run (MLflow's system/* metrics) while the block runs.

    The monitor logs to the run by id from its own thread; interval_s <= 0 disables it.
    """
    if interval_s <= 0:
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    with quiet():
        monitor = SystemMetricsMonitor(tracker.run_id, sampling_interval=interval_s, tracking_uri=tracker.uri)
        monitor.start()
    try:
        yield
    finally:
        with quiet():
            monitor.finish()


def run_catalog(uri: str, run_id: str | None) -> pd.DataFrame | None:
    """The split catalog snapshot a run logged under CATALOG_ARTIFACTS (its model's training data), or None."""
    if not run_id:
        return None
    import tempfile

    with quiet(), tempfile.TemporaryDirectory() as folder:
        try:
            local = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=CATALOG_ARTIFACTS, dst_path=folder, tracking_uri=uri
            )
        except (MlflowException, OSError) as error:
            log.debug("run %s has no %s artifacts: %s", run_id, CATALOG_ARTIFACTS, error)
            return None
        tables = [pd.read_parquet(path) for path in sorted(Path(local).rglob("*.parquet"))]
    return pd.concat(tables, ignore_index=True) if tables else None


def code_version(start: Path | None = None) -> str:
    """The git commit of the code (or 'unknown' outside a git checkout)."""
    import subprocess

    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=start or Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def recent_runs(uri: str, experiment: str, limit: int = 5) -> list[dict[str, Any]]:
    """The latest pipeline runs (top-level) with status and a few metrics, newest first."""
    newest = {"order_by": ["attributes.start_time DESC"], "max_results": limit}
    runs = _search_runs(uri, experiment, "tags.aidetect.kind = 'pipeline'", **newest)
    return [
        {
            "run_id": run.info.run_id,
            "name": run.info.run_name,
            "status": run.info.status,
            "start_time": pd.Timestamp(run.info.start_time, unit="ms", tz="UTC").isoformat(),
            "test_accuracy": run.data.metrics.get("test.accuracy"),
        }
        for run in runs
    ]


def _search_runs(uri: str, experiment: str, filter_string: str, **options: Any) -> list[Any]:
    """The runs of the named experiment that match filter_string (none when there is no such experiment)."""
    client = MlflowClient(tracking_uri=uri)
    with quiet():
        found = client.get_experiment_by_name(experiment)
        if found is None:
            return []
        return client.search_runs([found.experiment_id], filter_string=filter_string, **options)


def run_summary(uri: str, run_id: str) -> dict[str, Any]:
    """Params, metrics, tags, dataset inputs and artifact paths of a run (for tests and status)."""
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)

    def walk(path: str | None = None) -> list[str]:
        found = []
        for item in client.list_artifacts(run_id, path):
            found.extend(walk(item.path) if item.is_dir else [item.path])
        return found

    return {
        "status": run.info.status,
        "params": dict(run.data.params),
        "metrics": dict(run.data.metrics),
        "tags": dict(run.data.tags),
        "datasets": [(d.dataset.name, d.dataset.digest) for d in (run.inputs.dataset_inputs or [])],
        "artifacts": walk(),
    }
