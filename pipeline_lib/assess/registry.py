"""The model registry's policy: which alias a run competes for, whether the alias moves, and the registered models
rebuilt from their state_dict (for re-scoring and `predict`); MLflow access goes through core.tracking."""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Any

from pipeline_lib.core.tracking import logged_models, versions
from pipeline_lib.core.tracking.logged_models import IMAGE_SIZE_TAG, STATE_DICT_PATH, UnsafeModelError
from pipeline_lib.core.tracking.runs import Tracker
from pipeline_lib.core.tracking.versions import ARCHITECTURE_TAG, CALIBRATION_TAG, CHAMPION
from pipeline_lib.learn import models

log = logging.getLogger(__name__)


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


def decide(
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
    current = versions.current_champion(tracker.uri, name, alias)
    tags = {"test_digest": test_digest, "model_digest": model_digest}
    if image_size is not None:
        tags[IMAGE_SIZE_TAG] = str(int(image_size))
    if calibration is not None:
        tags[CALIBRATION_TAG] = calibration
        tracker.set_tags({f"aidetect.{CALIBRATION_TAG}": calibration})  # predict --model RUN_ID
    if architecture is not None:
        tags[ARCHITECTURE_TAG] = architecture
    version = versions.register_version(tracker, model_uri, name, tags | {"test_accuracy": f"{score:.6f}"})
    if current is not None and champion_score is not None and not_comparable is None:
        # The holder's score on this test split, kept on its version so that the next run on that split reuses it.
        rescored = {"test_digest": test_digest, "test_accuracy": f"{champion_score:.6f}", "rescored_by": tracker.run_id}
        versions.set_version_tags(tracker.uri, name, str(current.version), rescored)
    old_score = champion_score
    if current is not None and old_score is None and current.tags.get("test_digest") == test_digest:
        old_score = float(current.tags.get("test_accuracy", "nan"))
    promoted, reason = decide(alias, score, current, old_score, not_comparable, promote)
    if promoted:
        versions.set_alias(tracker.uri, name, alias, version)
    return ChampionDecision(
        version=version,
        promoted=promoted,
        challenger_score=score,
        champion_score=old_score,
        champion_version=None if current is None else str(current.version),
        reason=reason,
        alias=alias,
        comparable=not_comparable is None,
    )


def load_champion(uri: str, name: str, alias: str = CHAMPION, trust_pickle: bool = False) -> tuple[Any, int]:
    """The champion (or another alias) of registered model name as (torch model in eval mode, its image size)."""
    current = versions.current_champion(uri, name, alias)
    if current is None:
        raise logged_models.ModelNotFoundError(
            f"registered model {name!r} has no {alias!r} in {uri} (run the pipeline first, or pass a checkpoint)"
        )
    tagged = (current.tags or {}).get(IMAGE_SIZE_TAG)
    model_uri = f"models:/{name}@{alias}"
    return _load_torch(uri, model_uri, int(tagged) if tagged else None, f"{alias} of {name!r}", trust_pickle)


def load_run_model(uri: str, run_id: str, trust_pickle: bool = False) -> tuple[Any, int]:
    """The model logged by a run (name 'model') as (torch model in eval mode, image size it expects)."""
    model_uri, size = logged_models.logged_model_of_run(uri, run_id)
    return _load_torch(uri, model_uri, size, f"model of run {run_id}", trust_pickle)


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
    return logged_models.load_pickled(uri, model_uri, image_size, what)


def _load_state_dict(uri: str, model_uri: str, what: str) -> tuple[Any, int] | None:
    """(model rebuilt in code from the logged state_dict, image size), loaded weights only; None if there is none.

    UnsafeModelError when the file is there but is not a plain checkpoint (e.g. a pickle that would run code).
    """
    path = logged_models.download_state_dict(uri, model_uri)
    if path is None:
        return None
    try:
        model, meta = models.load_model(path)
    except (models.CheckpointError, FileNotFoundError) as error:
        raise UnsafeModelError(f"{what}: the state_dict of {model_uri} cannot be loaded safely: {error}") from None
    return model, int(meta["image_size"])
