"""The champion policy: a run's model registered as a version, the alias holder re-scored on the same test images
with its own calibration, compared (overlap check, McNemar's paired test) and the alias moved or not; and the
registered models rebuilt from their state_dict (for re-scoring and `predict`). MLflow access goes through
core.tracking.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline_lib.assess import calibration as calibration_lib
from pipeline_lib.assess import comparison
from pipeline_lib.assess.model_calibration import ModelCalibration, parse_calibration
from pipeline_lib.core.tracking import logged_models, versions
from pipeline_lib.core.tracking.logged_models import IMAGE_SIZE_TAG, STATE_DICT_PATH, UnsafeModelError
from pipeline_lib.core.tracking.runs import Tracker, run_catalog
from pipeline_lib.core.tracking.versions import ARCHITECTURE_TAG, CALIBRATION_TAG, CHAMPION
from pipeline_lib.core.workspace import Workspace
from pipeline_lib.learn import preprocess

# torch, torchvision and the modules that import them (evaluate, stats' scikit-learn, models, devices) are imported
# where a model is loaded or scored: a run whose model is registered already needs none of them.

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
    not_comparable: str = ""  # why the holder could not be compared fairly ("" when it could)


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
    """(promoted, reason) of a challenger with score against the alias holder current (old_score: its score, None or
    NaN when it has none on this test split: not comparable then)."""
    if current is None:
        return True, f"no {alias} yet"
    not_comparable = not_comparable or _unscored(alias, old_score)
    if not_comparable is not None:
        if promote:
            return True, f"{not_comparable}; promoted anyway (--promote)"
        return False, f"{not_comparable}; {alias} stays (pass --promote to promote this model anyway)"
    if score > old_score:  # type: ignore[operator]
        return True, f"accuracy {score:.4f} > {alias} {old_score:.4f}"
    return False, f"accuracy {score:.4f} <= {alias} {old_score:.4f}"


def _unscored(alias: str, old_score: float | None) -> str | None:
    """Why the holder cannot be compared when it has no score on this test split, else None."""
    if old_score is None or math.isnan(old_score):
        return f"{alias} was scored on another test split and not re-scored"
    return None


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
    if current is not None:
        not_comparable = not_comparable or _unscored(alias, old_score)
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
        not_comparable=not_comparable or "",
    )


@dataclass(frozen=True)
class Challenger:
    """A run's model as the registry step sees it: its checkpoint, its test predictions and how it scores."""

    checkpoint: Path  # the aidetect checkpoint (state_dict + meta)
    model_digest: str  # content digest of the checkpoint: a version made from it is never registered twice
    predictions: Path  # the evaluate stage's per-image table of the test split (sha256, label, ..., correct)
    metrics: Mapping[str, float]  # its test metrics: accuracy and the threshold at least
    calibration: ModelCalibration  # its temperature and normalisation policy
    test_digest: str  # names the test split


def register_challenger(
    workspace: Workspace,
    tracker: Tracker,
    challenger: Challenger,
    name: str,
    alias: str = CHAMPION,
    promote: bool = False,
    device: str = "cpu",
    trust_pickle: bool = False,
) -> dict[str, Any]:
    """Log the challenger (pickle format, with its state_dict beside it) unless this checkpoint is registered
    already; maybe move the alias to it. The decision as a small dict, also logged as metrics and tags of the run.

    alias is `champion`, or `loo-<generator>` for a leave-one-generator-out run (which never touches `champion`).
    The model holding the alias is scored on this test split too (on device, in batches): rebuilt from its
    state_dict (never unpickled unless trust_pickle), decoded with its own recorded normalisation and calibrated with
    its own temperature (its version's calibration tag); McNemar's paired test on the two models' per-image
    correctness says whether the difference is more than noise. When some of these test images were in that model's
    training or validation data the two are not comparable: the alias stays unless promote (--promote). A holder
    that cannot be loaded is reported and skipped.
    """
    existing = versions.find_version(tracker.uri, name, challenger.model_digest)
    if existing is not None:
        return register_again(tracker, name, str(existing.version), alias, promote)
    model_uri, meta = _log_challenger(tracker, challenger.checkpoint)
    size = int(meta["image_size"])
    rows = pd.read_parquet(challenger.predictions)
    holder = versions.current_champion(tracker.uri, name, alias)
    unfair = not_comparable(tracker.uri, holder, rows["sha256"].tolist())
    champion, skipped = score_champion(workspace, tracker.uri, name, alias, rows, challenger, device, trust_pickle)
    champion_score = rescored_score(challenger.test_digest, holder, champion)
    paired = paired_test(tracker, champion, rows)
    decision = register_model(
        tracker,
        model_uri,
        name,
        float(challenger.metrics["accuracy"]),
        challenger.test_digest,
        challenger.model_digest,
        champion_score=champion_score,
        image_size=size,
        calibration=json.dumps(challenger.calibration.as_dict()),
        alias=alias,
        not_comparable=unfair,
        promote=promote,
        architecture=str(meta["model_name"]),
    )
    log_decision(tracker, decision, rescored=champion_score is not None, image_size=size)
    if skipped:
        tracker.set_tags({"aidetect.champion_skipped": skipped})
    return paired | ({"champion_skipped": skipped} if skipped else {}) | _outcome(decision)


def register_again(tracker: Tracker, name: str, version: str, alias: str, promote: bool) -> dict[str, Any]:
    """The outcome for a checkpoint an earlier run registered as version (a cached model): the alias moves to that
    version when no version holds it yet, or with promote (--promote); it is never compared twice."""
    holder = versions.current_champion(tracker.uri, name, alias)
    before = None if holder is None else str(holder.version)
    promoted = before != version and (before is None or promote)
    if promoted:
        versions.set_alias(tracker.uri, name, alias, version)
    if before == version:
        reason = f"same checkpoint already registered; it holds {alias}"
    elif promoted:
        reason = f"same checkpoint already registered; {'promoted (--promote)' if before else f'no {alias} yet'}"
    else:
        reason = f"same checkpoint already registered; {alias} stays (pass --promote to promote it)"
    tags = {"aidetect.model_version": version, "aidetect.model_reused": "true", "aidetect.champion_alias": alias}
    tracker.set_tags(tags | {"aidetect.champion_decision": reason, "aidetect.champion_promoted": str(promoted).lower()})
    log.info("%s: version %s; %s", name, version, reason)
    aliases = [alias] if promoted or before == version else []
    return {"version": version, "promoted": promoted, "reason": reason, "alias": alias, "reused": True} | {
        "champion_version": before,
        "aliases": aliases,
    }


def _log_challenger(tracker: Tracker, checkpoint: Path) -> tuple[str, dict[str, Any]]:
    """(model URI, checkpoint meta): the checkpoint's model logged to the run with the checkpoint inside it."""
    import torch
    import torchvision

    from pipeline_lib.learn import models

    model, meta = models.load_model(checkpoint)
    size = int(meta["image_size"])
    example = torch.rand(1, 3, size, size).numpy()
    requirements = [
        f"torch=={torch.__version__.split('+')[0]}",
        f"torchvision=={torchvision.__version__.split('+')[0]}",
        *models.library_requirements(str(meta["model_name"])),
    ]
    return logged_models.log_pytorch_model(tracker, model, example, requirements, checkpoint=checkpoint), meta


def _outcome(decision: ChampionDecision) -> dict[str, Any]:
    """The decision as the flow's summary reports it."""
    return {
        "version": decision.version,
        "promoted": decision.promoted,
        "reason": decision.reason,
        "alias": decision.alias,
        "comparable": decision.comparable,
        "not_comparable": decision.not_comparable,
        "challenger_score": decision.challenger_score,
        "champion_score": decision.champion_score,
        "champion_version": decision.champion_version,
    }


def not_comparable(uri: str, holder: Any, test_images: list[str]) -> str | None:
    """Why the alias holder cannot be compared on these test images (it trained on some of them), or None."""
    if holder is None:
        return None
    trained_on = run_catalog(uri, holder.run_id)
    if trained_on is None:
        log.warning("version %s of the registry records no training catalog: overlap not checked", holder.version)
        return None
    return comparison.overlap_reason(test_images, comparison.seen_in_training(trained_on), str(holder.version))


def score_champion(
    workspace: Workspace,
    uri: str,
    name: str,
    alias: str,
    rows: pd.DataFrame,
    challenger: Challenger,
    device: str = "cpu",
    trust_pickle: bool = False,
) -> tuple[pd.DataFrame | None, str]:
    """(The alias holder's predictions on the challenger's test rows, in their order, or None; why it was skipped,
    "" if it was not).

    The images are decoded with the holder's own normalisation and its logits calibrated with its own temperature;
    the threshold is the challenger's.
    """
    from pipeline_lib.assess import evaluate as evaluate_lib
    from pipeline_lib.core import devices

    if versions.current_champion(uri, name, alias) is None:
        return None, ""
    try:
        champion, size = load_champion(uri, name, alias, trust_pickle)
        recorded = versions.champion_calibration(uri, name, alias)
        calibration = parse_calibration(recorded, f"calibration tag of {name}@{alias}") if recorded else None
    except (logged_models.ModelNotFoundError, ValueError) as error:
        log.warning("%s not scored, skipped: %s", alias, error)
        return None, str(error)
    calibration = calibration or ModelCalibration()
    if rows.empty:
        return None, ""
    policy = calibration.normalize
    policy = policy if policy is not None and policy.mode != "none" else None
    images = preprocess.load_tensors(workspace, rows["sha256"].tolist(), size, policy)
    logits = evaluate_lib.predict_logits(champion, images, device=devices.resolve_device(device))
    p_ai = calibration_lib.apply_temperature(logits, calibration.temperature)
    threshold = float(challenger.metrics["threshold"])
    return evaluate_lib.predictions_table(rows, p_ai, threshold, p_ai_raw=evaluate_lib.softmax_p_ai(logits)), ""


def rescored_score(test_digest: str, holder: Any, champion: pd.DataFrame | None) -> float | None:
    """The holder's accuracy on this test split when it was scored on another one; else None (nothing to do)."""
    if champion is None or holder is None or (holder.tags or {}).get("test_digest") == test_digest:
        return None
    return float(champion["correct"].mean()) if len(champion) else None


def paired_test(tracker: Tracker, champion: pd.DataFrame | None, challenger: pd.DataFrame) -> dict[str, Any]:
    """McNemar on champion vs challenger correctness over the same test images: metric and tags, and a log line."""
    from pipeline_lib.assess import stats

    if champion is None or champion.empty:
        return {}
    result = stats.mcnemar(champion["correct"].to_numpy(bool), challenger["correct"].to_numpy(bool))
    message = result.describe()
    log.info("champion vs challenger: %s", message)
    counts = {"registry.mcnemar_b": float(result.b), "registry.mcnemar_c": float(result.c)}
    tracker.log_metrics({"registry.mcnemar_p": result.p_value} | counts)
    tracker.set_tags({"registry.mcnemar_p": f"{result.p_value:.6g}", "aidetect.champion_mcnemar": message})
    return {"mcnemar_p": result.p_value, "mcnemar": message, "mcnemar_verdict": result.verdict()}


def log_decision(tracker: Tracker, decision: ChampionDecision, rescored: bool, image_size: int) -> None:
    """Both scores as metrics, the decision as tags of the run."""
    scores = {"registry.challenger_score": decision.challenger_score}
    if decision.champion_score is not None:
        scores["registry.champion_score"] = decision.champion_score
    tracker.log_metrics(scores | {"registry.promoted": float(decision.promoted)})
    tracker.set_tags(
        {
            "aidetect.model_version": decision.version,
            "aidetect.champion_decision": decision.reason,
            "aidetect.champion_promoted": str(decision.promoted).lower(),
            "aidetect.champion_previous_version": decision.champion_version or "",
            "aidetect.champion_rescored": str(rescored).lower(),
            "aidetect.champion_alias": decision.alias,
            "aidetect.champion_comparable": str(decision.comparable).lower(),
            f"aidetect.{IMAGE_SIZE_TAG}": str(image_size),
        }
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
    from pipeline_lib.learn import models

    with logged_models.downloaded_state_dict(uri, model_uri) as path:
        if path is None:
            return None
        try:
            model, meta = models.load_model(path)
        except (models.CheckpointError, FileNotFoundError) as error:
            raise UnsafeModelError(f"{what}: the state_dict of {model_uri} cannot be loaded safely: {error}") from None
    return model, int(meta["image_size"])
