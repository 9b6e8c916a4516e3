"""Models logged to a run: logging a torch model with its aidetect checkpoint, and reading a logged model's files.

Rebuilding a model from its checkpoint is not done here (pipeline_lib.assess.registry does it with learn.models):
this module only finds and downloads files, and unpickles a model only when a caller asks.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pipeline_lib.core.tracking.runs import Tracker
from pipeline_lib.core.tracking.store import global_uri, quiet

log = logging.getLogger(__name__)

IMAGE_SIZE_TAG = "image_size"  # model version tag (and aidetect.<tag> run tag): the square input size of the model
STATE_DICT_PATH = "extra_files/best.pt"  # inside a logged model: the aidetect checkpoint (state_dict + meta)


class ModelNotFoundError(LookupError):
    """No registered champion, run or logged model where one was asked for; the message says what is missing."""


class UnsafeModelError(ModelNotFoundError):
    """A logged model can only be loaded by unpickling (code from the tracking store) and that was not allowed."""


@contextlib.contextmanager
def _active_run(tracker: Tracker) -> Iterator[None]:
    """Make the tracker's run the fluent active run of this thread (for mlflow.pytorch)."""
    with global_uri(tracker.uri):
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
    with contextlib.ExitStack() as stack:
        extra = [str(stack.enter_context(_as_best_pt(checkpoint)))] if checkpoint is not None else None
        with quiet(), _active_run(tracker):
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


@contextlib.contextmanager
def _as_best_pt(checkpoint: Path) -> Iterator[Path]:
    """The checkpoint under the file name STATE_DICT_PATH expects: itself, or a copy in a temporary folder that is
    removed on exit (a checkpoint is about 200 MB: a leaked copy per logged model fills a disk)."""
    import shutil
    import tempfile

    checkpoint = Path(checkpoint)
    name = Path(STATE_DICT_PATH).name
    if checkpoint.name == name:
        yield checkpoint
        return
    with tempfile.TemporaryDirectory(prefix="aidetect-model-") as folder:
        target = Path(folder) / name
        shutil.copyfile(checkpoint, target)
        yield target


def logged_model_id(model_uri: str) -> str | None:
    """The logged model's id in a models:/m-<id> URI (a tracking server requires it with such a source), else None."""
    return model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None


def logged_model_of_run(uri: str, run_id: str) -> tuple[str, int | None]:
    """(URI of the model a run logged, the image size its aidetect.image_size run tag records or None).

    ModelNotFoundError when there is no such run or it logged no model.
    """
    client = MlflowClient(tracking_uri=uri)
    with quiet():
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
    return found[0].model_uri, int(tagged) if tagged else None


@contextlib.contextmanager
def downloaded_state_dict(uri: str, model_uri: str) -> Iterator[Path | None]:
    """A logged model's aidetect checkpoint (STATE_DICT_PATH) downloaded into a temporary folder that is removed
    on exit, or None when the model has no such file. Load it inside the with block."""
    import tempfile

    artifact_uri = f"{_model_files_uri(uri, model_uri)}/{STATE_DICT_PATH}"
    with tempfile.TemporaryDirectory(prefix="aidetect-model-") as folder:
        with quiet(), global_uri(uri):
            try:
                found = mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=folder)
                path: Path | None = Path(found)
            except (MlflowException, OSError) as error:
                log.debug("no %s: %s", artifact_uri, error)
                path = None
        yield path


def _model_files_uri(uri: str, model_uri: str) -> str:
    """Where a logged model's files can be read by path: a registered version's models:/name@alias (or /version)
    as it is; a logged model's own id (models:/m-...) through its artifact location, since MLflow reads the first
    part of models:/<x>/<path> as a registered model's name."""
    model_id = logged_model_id(model_uri)
    if model_id is None:
        return model_uri
    with quiet():
        try:
            return str(MlflowClient(tracking_uri=uri).get_logged_model(model_id).artifact_location)
        except MlflowException:
            return model_uri


def load_pickled(uri: str, model_uri: str, image_size: int | None, what: str) -> tuple[Any, int]:
    """(The pickled model in eval mode, its image size): unpickling runs code from the tracking store, so call it
    only when the user trusts that store (--trust-pickle)."""
    import tempfile

    import mlflow.pytorch
    import torch

    log.warning("%s: unpickling %s as asked (--trust-pickle)", what, model_uri)
    with quiet(), global_uri(uri), tempfile.TemporaryDirectory(prefix="aidetect-model-") as folder:
        try:
            model = mlflow.pytorch.load_model(model_uri, dst_path=folder, map_location="cpu")
        except (MlflowException, OSError) as error:
            raise ModelNotFoundError(f"{what}: cannot load {model_uri} from {uri}: {error}") from None
        except Exception as error:  # noqa: BLE001 - a replaced file unpickles to anything (MLflow then calls .eval())
            raise _not_a_model(what, model_uri, f"{type(error).__name__}: {error}") from None
        size = image_size or _signature_image_size(model_uri)
    if not isinstance(model, torch.nn.Module):
        raise _not_a_model(what, model_uri, f"it unpickles to a {type(model).__name__}")
    if size is None:
        raise ModelNotFoundError(f"{what}: {model_uri} records no image size (no {IMAGE_SIZE_TAG!r} tag or signature)")
    return model.eval(), int(size)


def _not_a_model(what: str, model_uri: str, why: str) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"{what}: {model_uri} holds no torch model ({why}) and no state_dict to rebuild one from: register a model "
        "trained by aidetect, or pass --model a checkpoint file (.pt)"
    )


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
