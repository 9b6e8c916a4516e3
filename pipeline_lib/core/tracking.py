"""MLflow tracking: the only module that imports mlflow. Every call names its run by id."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import re
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline_lib.core import privacy

privacy.quiet_mlflow()  # MLflow starts its telemetry client when it is first imported: off unless the user chose

import mlflow  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import RunStatus  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402

from pipeline_lib.core.workspace import Workspace  # noqa: E402

log = logging.getLogger(__name__)

CHAMPION = "champion"
IMAGE_SIZE_TAG = "image_size"  # model version tag: the square input size the model was trained at
CALIBRATION_TAG = "calibration"  # model version tag: JSON with the temperature and normalisation policy
LOCAL_UI_HOST, LOCAL_UI_PORT = "127.0.0.1", 5000  # where `aidetect ui` serves a store that has no server of its own
# MLflow 3's UI opens an experiment in the view its kind names; without the tag it may guess the GenAI one.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # the classic training view: runs, metrics, models
ARCHITECTURE_TAG = "architecture"  # model version tag: the backbone name the state_dict is rebuilt into
STATE_DICT_PATH = "extra_files/best.pt"  # inside a logged model: the aidetect checkpoint (state_dict + meta)


class ModelNotFoundError(LookupError):
    """No registered champion, run or logged model where one was asked for; the message says what is missing."""


class UnsafeModelError(ModelNotFoundError):
    """A logged model can only be loaded by unpickling (code from the tracking store) and that was not allowed."""


def tracking_uri(uri: str | None, workspace: Workspace) -> str:
    """The configured tracking URI, or the embedded SQLite store inside the workspace."""
    return uri or f"sqlite:///{workspace.root / 'mlflow.db'}"


def is_server(uri: str) -> bool:
    """True if uri is an MLflow tracking server (http/https), which serves its own UI and artifacts."""
    return uri.startswith(("http://", "https://"))


def ui_address(uri: str) -> str:
    """Where the MLflow UI of a tracking URI is: the server itself, or where `aidetect ui` serves a database store."""
    return uri.rstrip("/") if is_server(uri) else f"http://{LOCAL_UI_HOST}:{LOCAL_UI_PORT}"


def artifact_root(workspace: Workspace) -> str:
    """Where runs of an embedded store keep their artifacts (never the current directory)."""
    path = workspace.root / "mlartifacts"
    path.mkdir(parents=True, exist_ok=True)
    return path.as_uri()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence MLflow's noisy warnings (pip inference, pydantic) around a call."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


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
        rows = _metric_rows(metrics, step)
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
        with _quiet():
            dataset = mlflow.data.from_pandas(frame, source=source, name=name, digest=digest[:36], targets="label")
            dataset_input = mlflow.entities.DatasetInput(
                dataset._to_mlflow_entity(), tags=[mlflow.entities.InputTag("mlflow.data.context", context)]
            )
            self.client.log_inputs(self.run_id, datasets=[dataset_input])

    def finish(self, status: str = "FINISHED") -> None:
        """End the run with FINISHED, FAILED or KILLED."""
        self.client.set_terminated(self.run_id, status=RunStatus.to_string(RunStatus.from_string(status)))

    def run_url(self) -> str:
        """A link to the run in the MLflow UI (relative to the UI's address for embedded stores)."""
        run = self.client.get_run(self.run_id)
        return f"#/experiments/{run.info.experiment_id}/runs/{self.run_id}"

    def ui_link(self) -> tuple[str, str]:
        """(URL of the run in the MLflow UI of this tracking URI, link text saying whether `aidetect ui` must run)."""
        url = f"{ui_address(self.uri)}/{self.run_url()}"
        return url, "MLflow run" if is_server(self.uri) else "MLflow run (after `aidetect ui`)"


def _metric_rows(metrics: Mapping[str, float], step: int | None = None) -> list[Any]:
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


def ensure_experiment(uri: str, name: str, workspace: Workspace) -> str:
    """Id of the named experiment, in the training view; a new one keeps its artifacts in the workspace, unless a
    tracking server has them."""
    client = MlflowClient(tracking_uri=uri)
    with _quiet():
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            location = None if is_server(uri) else artifact_root(workspace)
            tags = {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
            return client.create_experiment(name, artifact_location=location, tags=tags)
        if EXPERIMENT_KIND_TAG not in experiment.tags:  # made by an earlier aidetect (or by hand): keep a user's kind
            client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return experiment.experiment_id


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
    with _quiet():
        run = MlflowClient(tracking_uri=uri).create_run(experiment_id, run_name=run_name, tags=all_tags)
    return Tracker(uri, run.info.run_id)


STAGE_KIND = "stage"  # aidetect.kind of the nested run of one stage (the pipeline's run has kind "pipeline")
WORKSPACE_TAG = "aidetect.workspace"  # the workspace a run wrote to (with aidetect.host and aidetect.pid)


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

    client = MlflowClient(tracking_uri=uri)
    with _quiet():
        found = client.get_experiment_by_name(experiment)
        if found is None:
            return []
        runs = client.search_runs(
            [found.experiment_id],
            filter_string=f"attributes.status = 'RUNNING' and tags.`{WORKSPACE_TAG}` = '{workspace.root}'",
        )
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


KEY_PARAM_PREFIX = "key."  # params of a stage run: the parts of its cache key (pipeline_lib.core.cachekey)


def stage_run(
    parent: Tracker,
    stage: str,
    state: str,
    metrics: Mapping[str, float],
    seconds: float,
    failed: bool = False,
    params: Mapping[str, str] | None = None,
    tags: Mapping[str, str] | None = None,
    ended_at: float | None = None,
    history: Sequence[Mapping[str, Any]] = (),
) -> Tracker:
    """A finished child run of parent for one stage (by id, thread-safe): its metrics, cache state and duration, and
    the params and tags given (the parts of its cache key).

    The run starts `seconds` before ended_at (time.time(), default now) and ends then, so the UI shows how long the
    stage really took. history: per-epoch rows (epoch, train_loss, ...) logged as train.* metrics by step.
    """
    experiment_id, inherited = _parent_context(parent.uri, parent.run_id)
    all_tags = dict(inherited) | dict(tags or {}) | {
        "mlflow.parentRunId": parent.run_id,
        "aidetect.kind": STAGE_KIND,
        "aidetect.stage": stage,
        "aidetect.state": state,
    }
    end_ms = int((time.time() if ended_at is None else ended_at) * 1000)
    start_ms = end_ms - int(max(seconds, 0.0) * 1000)
    with _quiet():
        run = parent.client.create_run(experiment_id, start_time=start_ms, run_name=stage, tags=all_tags)
    child = Tracker(parent.uri, run.info.run_id)
    rows = _metric_rows(dict(metrics) | {"stage.seconds": float(seconds)})
    values = [mlflow.entities.Param(str(k), str(v)[:6000]) for k, v in (params or {}).items()]
    for start in range(0, max(len(rows), len(values)), 100):  # one call for a stage's params and metrics
        child.client.log_batch(child.run_id, metrics=rows[start : start + 100], params=values[start : start + 100])
    for row in history:
        child.log_metrics(epoch_metrics(row), step=int(row["epoch"]))
    status = "FAILED" if failed else "FINISHED"
    parent.client.set_terminated(child.run_id, status=status, end_time=end_ms)
    return child


def epoch_metrics(row: Mapping[str, Any]) -> dict[str, float]:
    """One epoch's numbers as train.* metrics (the phase and other text left out)."""
    return {
        f"train.{key}": float(value)
        for key, value in row.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }


def previous_stage_keys(parent: Tracker, workspace: str, scan: int = 200) -> dict[str, dict[str, str]]:
    """Stage name -> the key.* params of its latest run in this workspace under another parent run (one query).

    Only the latest `scan` stage runs of the experiment are looked at (other workspaces may share it).
    """
    experiment_id, _ = _parent_context(parent.uri, parent.run_id)
    with _quiet():
        runs = parent.client.search_runs(
            [experiment_id],
            filter_string=f"tags.`aidetect.kind` = '{STAGE_KIND}'",
            order_by=["attributes.start_time DESC"],
            max_results=scan,
        )
    found: dict[str, dict[str, str]] = {}
    for run in runs:
        tags, stage = run.data.tags, run.data.tags.get("aidetect.stage", "")
        if stage in found or tags.get("aidetect.workspace") != workspace:
            continue
        if tags.get("mlflow.parentRunId") != parent.run_id:
            params = run.data.params
            found[stage] = {k[len(KEY_PARAM_PREFIX) :]: v for k, v in params.items() if k.startswith(KEY_PARAM_PREFIX)}
    return found


@functools.lru_cache(maxsize=64)
def _parent_context(uri: str, run_id: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """Experiment id and the lineage tags (flow run id, git commit) a parent run hands to its stage runs."""
    with _quiet():
        run = MlflowClient(tracking_uri=uri).get_run(run_id)
    keys = ("prefect.flow_run_id", "prefect.deployment_id", "mlflow.source.git.commit")
    return run.info.experiment_id, tuple((key, run.data.tags[key]) for key in keys if key in run.data.tags)


def stage_runs(parent: Tracker) -> dict[str, dict[str, Any]]:
    """The child stage runs of parent by stage name (the last one when a stage ran twice)."""
    client = parent.client
    with _quiet():
        experiment_id = client.get_run(parent.run_id).info.experiment_id
        runs = client.search_runs(
            [experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}'",
            order_by=["attributes.start_time ASC"],
        )
    return {
        run.data.tags.get("aidetect.stage", run.info.run_name): {
            "run_id": run.info.run_id,
            "status": run.info.status,
            "state": run.data.tags.get("aidetect.state"),
            "metrics": dict(run.data.metrics),
        }
        for run in runs
    }


@contextlib.contextmanager
def system_metrics(tracker: Tracker, interval_s: float) -> Iterator[None]:
    """Sample CPU, memory, disk and GPU use into the run (MLflow's system/* metrics) while the block runs.

    The monitor logs to the run by id from its own thread; interval_s <= 0 disables it.
    """
    if interval_s <= 0:
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    with _quiet():
        monitor = SystemMetricsMonitor(tracker.run_id, sampling_interval=interval_s, tracking_uri=tracker.uri)
        monitor.start()
    try:
        yield
    finally:
        with _quiet():
            monitor.finish()


@contextlib.contextmanager
def _global_uri(uri: str) -> Iterator[None]:
    """Point MLflow's global tracking URI at uri for a block (model URIs models:/m-... resolve through it)."""
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


@contextlib.contextmanager
def _active_run(tracker: Tracker) -> Iterator[None]:
    """Make the tracker's run the fluent active run of this thread (for mlflow.pytorch)."""
    with _global_uri(tracker.uri):
        try:
            with mlflow.start_run(run_id=tracker.run_id, log_system_metrics=False):
                yield
        finally:
            # start_run(run_id=...) ends the run on exit; the pipeline decides its final status.
            tracker.client.update_run(tracker.run_id, status="RUNNING")


def log_pytorch_model(
    tracker: Tracker, model: Any, input_example: Any, requirements: list[str], checkpoint: Path | None = None
) -> str:
    """Log a torch model with pickle serialisation (torch.export fixes the batch size); return its URI.

    checkpoint: the aidetect checkpoint (state_dict + meta) the model came from, logged inside the model as
    STATE_DICT_PATH: what champion re-scoring and `predict` load (weights only, never unpickled).
    """
    import mlflow.pytorch
    from mlflow.models import infer_signature

    model.eval()
    import torch

    with torch.inference_mode():
        output = model(torch.as_tensor(input_example)).softmax(dim=1).numpy()
    signature = infer_signature(input_example, output)
    extra = [str(_as_best_pt(checkpoint))] if checkpoint is not None else None
    with _quiet(), _active_run(tracker):
        info = mlflow.pytorch.log_model(
            model,
            name="model",
            serialization_format="pickle",
            signature=signature,
            input_example=input_example,
            pip_requirements=requirements,
            extra_files=extra,
        )
    return info.model_uri


def _as_best_pt(checkpoint: Path) -> Path:
    """The checkpoint under the file name STATE_DICT_PATH expects (a copy in a temporary folder if it differs)."""
    import shutil
    import tempfile

    checkpoint = Path(checkpoint)
    name = Path(STATE_DICT_PATH).name
    if checkpoint.name == name:
        return checkpoint
    target = Path(tempfile.mkdtemp(prefix="aidetect-model-")) / name
    shutil.copyfile(checkpoint, target)
    return target


@dataclass(frozen=True)
class ChampionDecision:
    """What the registry step decided and why."""

    version: str
    promoted: bool
    challenger_score: float
    champion_score: float | None
    champion_version: str | None
    reason: str
    alias: str = CHAMPION
    comparable: bool = True


def alias_for(leave_out_generator: str | None) -> str:
    """The alias a run competes for: `champion`, or `loo-<generator>` for a leave-one-generator-out run."""
    if not leave_out_generator:
        return CHAMPION
    return "loo-" + (re.sub(r"[^a-z0-9_-]+", "-", leave_out_generator.lower()).strip("-") or "generator")


def _decide(
    alias: str,
    score: float,
    current: Any,
    old_score: float | None,
    not_comparable: str | None,
    promote: bool,
) -> tuple[bool, str]:
    """(promoted, reason) of a challenger with score against the alias holder current (old_score: its score)."""
    if current is None:
        return True, f"no {alias} yet"
    if not_comparable is None and (old_score is None or math.isnan(old_score)):
        not_comparable = f"{alias} was scored on another test split and not re-scored"
    if not_comparable is not None:
        if promote:
            return True, f"{not_comparable}; promoted anyway (--promote)"
        return False, f"{not_comparable}; {alias} stays (pass --promote to promote this model anyway)"
    if score > old_score:  # type: ignore[operator]
        return True, f"accuracy {score:.4f} > {alias} {old_score:.4f}"
    return False, f"accuracy {score:.4f} <= {alias} {old_score:.4f}"


def register_model(
    tracker: Tracker,
    model_uri: str,
    name: str,
    score: float,
    test_digest: str,
    model_digest: str,
    champion_score: float | None = None,
    image_size: int | None = None,
    calibration: str | None = None,
    alias: str = CHAMPION,
    not_comparable: str | None = None,
    promote: bool = False,
    architecture: str | None = None,
) -> ChampionDecision:
    """Register a model version; move `alias` to it only if it beats the current holder on a fair comparison.

    champion_score, when given, is the holder re-scored on this test split (its version's test_digest and
    test_accuracy tags are then updated, unless not comparable); otherwise the holder's recorded score is used if
    it was measured on the same test split (same digest). not_comparable (a reason) means the holder trained on some
    of these test images: the alias stays unless promote. image_size is kept as a version tag. Only `alias` and its
    holder's tags are ever changed: a leave-one-generator-out alias never moves `champion`.
    """
    client = tracker.client
    current = current_champion(tracker.uri, name, alias)
    with _quiet(), _global_uri(tracker.uri):
        try:
            client.create_registered_model(name)
        except MlflowException:
            pass  # already registered
        tags = {"test_digest": test_digest, "model_digest": model_digest}
        if image_size is not None:
            tags[IMAGE_SIZE_TAG] = str(int(image_size))
        if calibration is not None:
            tags[CALIBRATION_TAG] = calibration
            client.set_tag(tracker.run_id, f"aidetect.{CALIBRATION_TAG}", calibration)  # predict --model RUN_ID
        if architecture is not None:
            tags[ARCHITECTURE_TAG] = architecture
        version = client.create_model_version(
            name, model_uri, run_id=tracker.run_id, tags=tags, model_id=_logged_model_id(model_uri)
        )
        client.set_model_version_tag(name, version.version, "test_accuracy", f"{score:.6f}")
    if current is not None and champion_score is not None and not_comparable is None:
        _record_rescore(client, name, str(current.version), test_digest, champion_score, tracker.run_id)
    old_score = champion_score
    if current is not None and old_score is None and current.tags.get("test_digest") == test_digest:
        old_score = float(current.tags.get("test_accuracy", "nan"))
    promoted, reason = _decide(alias, score, current, old_score, not_comparable, promote)
    if promoted:
        client.set_registered_model_alias(name, alias, version.version)
    return ChampionDecision(
        version=str(version.version),
        promoted=promoted,
        challenger_score=score,
        champion_score=old_score,
        champion_version=None if current is None else str(current.version),
        reason=reason,
        alias=alias,
        comparable=not_comparable is None,
    )


def _logged_model_id(model_uri: str) -> str | None:
    """The logged model's id in a models:/m-<id> URI (a tracking server requires it with such a source), else None."""
    return model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None


def _record_rescore(
    client: MlflowClient, name: str, version: str, test_digest: str, score: float, run_id: str
) -> None:
    """Store a champion's score on a new test split on its version, so the next run on that split reuses it."""
    with _quiet():
        for key, value in (("test_digest", test_digest), ("test_accuracy", f"{score:.6f}"), ("rescored_by", run_id)):
            client.set_model_version_tag(name, version, key, value)


def _signature_image_size(model_uri: str) -> int | None:
    """The square input size from a logged model's signature (tensor [-1, 3, S, S]), or None."""
    from mlflow.models import get_model_info

    try:
        signature = get_model_info(model_uri).signature
    except (MlflowException, OSError) as error:
        log.debug("no model info for %s: %s", model_uri, error)
        return None
    if signature is None or signature.inputs is None:
        return None
    shapes = [getattr(spec, "shape", None) for spec in signature.inputs.inputs]
    shape = shapes[0] if shapes else None
    if shape is None or len(shape) != 4 or shape[-1] != shape[-2] or shape[-1] < 1:
        return None
    return int(shape[-1])


def _download(uri: str, artifact_uri: str) -> Path | None:
    """A logged model's file downloaded into a temporary folder, or None when the model has no such file."""
    import tempfile

    folder = tempfile.mkdtemp(prefix="aidetect-model-")
    with _quiet(), _global_uri(uri):
        try:
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=folder))
        except (MlflowException, OSError) as error:
            log.debug("no %s: %s", artifact_uri, error)
            return None


def _model_files_uri(uri: str, model_uri: str) -> str:
    """Where a logged model's files can be read by path: a registered version's models:/name@alias (or /version)
    as it is; a logged model's own id (models:/m-...) through its artifact location, since MLflow reads the first
    part of models:/<x>/<path> as a registered model's name."""
    model_id = _logged_model_id(model_uri)
    if model_id is None:
        return model_uri
    with _quiet():
        try:
            return str(MlflowClient(tracking_uri=uri).get_logged_model(model_id).artifact_location)
        except MlflowException:
            return model_uri


def _load_state_dict(uri: str, model_uri: str, what: str) -> tuple[Any, int] | None:
    """(model rebuilt in code from the logged state_dict, image size), loaded weights only; None if there is none.

    UnsafeModelError when the file is there but is not a plain checkpoint (e.g. a pickle that would run code).
    """
    from pipeline_lib.learn import models

    path = _download(uri, f"{_model_files_uri(uri, model_uri)}/{STATE_DICT_PATH}")
    if path is None:
        return None
    try:
        model, meta = models.load_model(path)
    except (models.CheckpointError, FileNotFoundError) as error:
        raise UnsafeModelError(f"{what}: the state_dict of {model_uri} cannot be loaded safely: {error}") from None
    return model, int(meta["image_size"])


def _load_pickled(uri: str, model_uri: str, image_size: int | None, what: str) -> tuple[Any, int]:
    """The pickled model (unpickling runs code from the tracking store: only with trust_pickle)."""
    import mlflow.pytorch

    log.warning("%s: unpickling %s as asked (--trust-pickle)", what, model_uri)
    with _quiet(), _global_uri(uri):
        try:
            model = mlflow.pytorch.load_model(model_uri, map_location="cpu")
        except (MlflowException, OSError) as error:
            raise ModelNotFoundError(f"{what}: cannot load {model_uri} from {uri}: {error}") from None
        size = image_size or _signature_image_size(model_uri)
    if size is None:
        raise ModelNotFoundError(f"{what}: {model_uri} records no image size (no {IMAGE_SIZE_TAG!r} tag or signature)")
    return model.eval(), int(size)


def _load_torch(
    uri: str, model_uri: str, image_size: int | None, what: str, trust_pickle: bool = False
) -> tuple[Any, int]:
    """(torch model on CPU in eval mode, image size) of model_uri, rebuilt from its state_dict with weights_only.

    A model logged without a state_dict can only be unpickled: UnsafeModelError unless trust_pickle.
    """
    loaded = _load_state_dict(uri, model_uri, what)
    if loaded is not None:
        return loaded[0].eval(), loaded[1]
    if not trust_pickle:
        raise UnsafeModelError(
            f"{what}: {model_uri} in {uri} carries no state_dict ({STATE_DICT_PATH}); loading it would unpickle "
            "it, which runs whatever code the tracking store holds. Pass --trust-pickle if you trust that store"
        )
    return _load_pickled(uri, model_uri, image_size, what)


def load_champion(uri: str, name: str, alias: str = CHAMPION, trust_pickle: bool = False) -> tuple[Any, int]:
    """The champion (or another alias) of registered model name as (torch model in eval mode, its image size)."""
    current = current_champion(uri, name, alias)
    if current is None:
        raise ModelNotFoundError(
            f"registered model {name!r} has no {alias!r} in {uri} (run the pipeline first, or pass a checkpoint)"
        )
    tagged = (current.tags or {}).get(IMAGE_SIZE_TAG)
    model_uri = f"models:/{name}@{alias}"
    return _load_torch(uri, model_uri, int(tagged) if tagged else None, f"{alias} of {name!r}", trust_pickle)


def champion_calibration(uri: str, name: str, alias: str = CHAMPION) -> str | None:
    """The champion (or alias) version's calibration tag (JSON text), or None when it has none."""
    current = current_champion(uri, name, alias)
    return None if current is None else (current.tags or {}).get(CALIBRATION_TAG)


CATALOG_ARTIFACTS = "catalog"  # where a pipeline run keeps the split catalog snapshot its model was trained on


def run_catalog(uri: str, run_id: str | None) -> pd.DataFrame | None:
    """The split catalog snapshot a run logged under CATALOG_ARTIFACTS (its model's training data), or None."""
    if not run_id:
        return None
    import tempfile

    with _quiet(), tempfile.TemporaryDirectory() as folder:
        try:
            local = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=CATALOG_ARTIFACTS, dst_path=folder, tracking_uri=uri
            )
        except (MlflowException, OSError) as error:
            log.debug("run %s has no %s artifacts: %s", run_id, CATALOG_ARTIFACTS, error)
            return None
        tables = [pd.read_parquet(path) for path in sorted(Path(local).rglob("*.parquet"))]
    return pd.concat(tables, ignore_index=True) if tables else None


def run_calibration(uri: str, run_id: str) -> str | None:
    """The calibration (JSON text) of the model a run logged: the run's aidetect.calibration tag, else the
    calibration tag of a model version registered from the run; None when neither exists."""
    client = MlflowClient(tracking_uri=uri)
    with _quiet():
        try:
            tagged = client.get_run(run_id).data.tags.get(f"aidetect.{CALIBRATION_TAG}")
        except MlflowException:
            raise ModelNotFoundError(f"no MLflow run {run_id!r} in {uri}") from None
        if tagged:
            return tagged
        try:
            versions = client.search_model_versions(f"run_id = '{run_id}'")
        except MlflowException:
            return None
    found = [v.tags.get(CALIBRATION_TAG) for v in versions if (v.tags or {}).get(CALIBRATION_TAG)]
    return found[0] if found else None


def load_run_model(uri: str, run_id: str, trust_pickle: bool = False) -> tuple[Any, int]:
    """The model logged by a run (name 'model') as (torch model in eval mode, image size it expects)."""
    client = MlflowClient(tracking_uri=uri)
    with _quiet():
        try:
            run = client.get_run(run_id)
        except MlflowException:
            raise ModelNotFoundError(f"no MLflow run {run_id!r} in {uri}") from None
        found = client.search_logged_models(
            experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'"
        )
    if not found:
        raise ModelNotFoundError(f"MLflow run {run_id} logged no model (its training may have failed)")
    tagged = run.data.tags.get(f"aidetect.{IMAGE_SIZE_TAG}")
    size = int(tagged) if tagged else None
    return _load_torch(uri, found[0].model_uri, size, f"model of run {run_id}", trust_pickle)


def find_version(uri: str, name: str, model_digest: str) -> Any | None:
    """The registered version made from this exact checkpoint (by digest), or None."""
    with _quiet():
        try:
            found = MlflowClient(tracking_uri=uri).search_model_versions(
                f"name = '{name}' and tags.model_digest = '{model_digest}'"
            )
        except MlflowException:
            return None
    return found[0] if found else None


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


def current_champion(uri: str, name: str, alias: str = CHAMPION) -> Any | None:
    """The model version holding the champion alias (or another alias), or None."""
    with _quiet():
        try:
            return MlflowClient(tracking_uri=uri).get_model_version_by_alias(name, alias)
        except MlflowException:
            return None


def recent_runs(uri: str, experiment: str, limit: int = 5) -> list[dict[str, Any]]:
    """The latest pipeline runs (top-level) with status and a few metrics, newest first."""
    client = MlflowClient(tracking_uri=uri)
    with _quiet():
        experiment_obj = client.get_experiment_by_name(experiment)
        if experiment_obj is None:
            return []
        runs = client.search_runs(
            [experiment_obj.experiment_id],
            filter_string="tags.aidetect.kind = 'pipeline'",
            order_by=["attributes.start_time DESC"],
            max_results=limit,
        )
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
