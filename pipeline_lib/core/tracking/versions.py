"""The registered model's versions: creating one, its tags, which version holds an alias, moving an alias.

Whether an alias moves is decided in pipeline_lib.assess.registry; this module only reads and writes the registry.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pipeline_lib.core.tracking.logged_models import ModelNotFoundError, logged_model_id
from pipeline_lib.core.tracking.runs import Tracker
from pipeline_lib.core.tracking.store import global_uri, quiet

CHAMPION = "champion"
CALIBRATION_TAG = "calibration"  # model version tag: JSON with the temperature and normalisation policy
ARCHITECTURE_TAG = "architecture"  # model version tag: the backbone name the state_dict is rebuilt into


def register_version(tracker: Tracker, model_uri: str, name: str, tags: Mapping[str, str]) -> str:
    """A new version of registered model name (registered first if need be) made from model_uri, a model of the
    tracker's run, with tags; its version number."""
    client = tracker.client
    with quiet(), global_uri(tracker.uri):
        try:
            client.create_registered_model(name)
        except MlflowException:
            pass  # already registered
        version = client.create_model_version(
            name, model_uri, run_id=tracker.run_id, tags=dict(tags), model_id=logged_model_id(model_uri)
        )
    return str(version.version)


def set_version_tags(uri: str, name: str, version: str, tags: Mapping[str, str]) -> None:
    """Set tags on one version of registered model name."""
    client = MlflowClient(tracking_uri=uri)
    with quiet():
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, value)


def set_alias(uri: str, name: str, alias: str, version: str) -> None:
    """Point alias of registered model name at version."""
    with quiet():
        MlflowClient(tracking_uri=uri).set_registered_model_alias(name, alias, version)


def current_champion(uri: str, name: str, alias: str = CHAMPION) -> Any | None:
    """The model version holding the champion alias (or another alias), or None."""
    with quiet():
        try:
            return MlflowClient(tracking_uri=uri).get_model_version_by_alias(name, alias)
        except MlflowException:
            return None


def champion_calibration(uri: str, name: str, alias: str = CHAMPION) -> str | None:
    """The champion (or alias) version's calibration tag (JSON text), or None when it has none."""
    current = current_champion(uri, name, alias)
    return None if current is None else (current.tags or {}).get(CALIBRATION_TAG)


def run_calibration(uri: str, run_id: str) -> str | None:
    """The calibration (JSON text) of the model a run logged: the run's aidetect.calibration tag, else the
    calibration tag of a model version registered from the run; None when neither exists."""
    client = MlflowClient(tracking_uri=uri)
    with quiet():
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


def find_version(uri: str, name: str, model_digest: str) -> Any | None:
    """The registered version made from this exact checkpoint (by digest), or None."""
    with quiet():
        try:
            found = MlflowClient(tracking_uri=uri).search_model_versions(
                f"name = '{name}' and tags.model_digest = '{model_digest}'"
            )
        except MlflowException:
            return None
    return found[0] if found else None
