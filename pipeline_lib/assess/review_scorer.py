"""The model that scores the review queue: the champion, else the newest model trained in the workspace.

Its penultimate features embed every image once (learn.features caches them per image and model); its own
predicted probabilities are used only where they are out of sample (the champion, for images it never trained on);
everywhere else a logistic regression on the cached features is cross-validated with group-aware folds.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pipeline_lib.assess import comparison, registry
from pipeline_lib.assess.predict import ModelCalibration, parse_calibration, read_calibration
from pipeline_lib.core.config import LABELS
from pipeline_lib.core.tracking import logged_models, versions
from pipeline_lib.core.tracking.runs import run_catalog
from pipeline_lib.core.workspace import Workspace
from pipeline_lib.learn import features, models
from pipeline_lib.learn.checkpoints import BEST_NAME

log = logging.getLogger(__name__)

NO_MODEL = "no champion and no trained model in the workspace to score the images (train one first)"


PAi = Callable[[np.ndarray], np.ndarray]  # a model's penultimate features -> its calibrated p_ai


@dataclass(frozen=True)
class Scorer:
    """A model that scores pending images: its feature extractor (cached per image), how its penultimate features
    become its own p_ai (None: its predictions do not judge labels, cross-validation does) and the sha256 of the
    images it trained on (where its own predictions are not out of sample).

    name: "<registered model>/<version>" or "checkpoint/<folder>"; the reviewer of its approvals is model:<name>.
    """

    name: str
    extractor: features.Extractor
    p_ai: PAi | None = None
    trained_on: frozenset[str] = field(default_factory=frozenset)

    @property
    def reviewer(self) -> str:
        """The reviewer recorded on the decisions this model makes."""
        return f"model:{self.name}"

    @property
    def own_predictions(self) -> bool:
        """Whether its own probabilities judge the labels of images it never trained on (the champion)."""
        return self.p_ai is not None


def head_p_ai(model: models.Classifier, temperature: float, penultimate: np.ndarray) -> np.ndarray:
    """Calibrated p_ai of a Classifier from its penultimate features: the head's logit margin over the temperature."""
    with torch.inference_mode():
        logits = model.head(torch.tensor(np.asarray(penultimate, dtype=np.float32))).double().numpy()
    margin = (logits[:, 1] - logits[:, 0]) / temperature
    return 1.0 / (1.0 + np.exp(-np.clip(margin, -700.0, 700.0)))


def classifier_scorer(
    name: str,
    model: models.Classifier,
    image_size: int,
    calibration: ModelCalibration | None = None,
    trained_on: frozenset[str] = frozenset(),
    own_predictions: bool = True,
) -> Scorer:
    """A Scorer of one of our Classifiers: its features as learn.features.classifier_extractor caches them, its head
    (with the calibration's temperature) for p_ai when own_predictions."""
    calibration = calibration or ModelCalibration()
    extractor = features.classifier_extractor(model, name, image_size, calibration.normalize)
    p_ai = functools.partial(head_p_ai, model, calibration.temperature) if own_predictions else None
    return Scorer(name, extractor, p_ai, frozenset(trained_on))


def _local_store_missing(uri: str) -> bool:
    """A SQLite store whose file does not exist (opening it would create an empty database for nothing)."""
    return uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file()


def champion_scorer(uri: str, name: str, trust_pickle: bool = False) -> tuple[Scorer | None, str]:
    """The champion of registered model name as a Scorer, or (None, why not)."""
    if _local_store_missing(uri):
        return None, f"no tracking store at {uri}"
    holder = versions.current_champion(uri, name)
    if holder is None:
        return None, f"registered model {name!r} has no champion in {uri}"
    try:
        model, size = registry.load_champion(uri, name, trust_pickle=trust_pickle)
        tag = versions.champion_calibration(uri, name)
        calibration = parse_calibration(tag, f"calibration tag of {name}@champion") if tag else ModelCalibration()
    except (logged_models.ModelNotFoundError, ValueError, OSError) as error:
        return None, f"the champion of {name!r} cannot be loaded: {error}"
    if not isinstance(model, models.Classifier):
        return None, f"the champion of {name!r} is not an aidetect Classifier (no features to embed with)"
    trained = run_catalog(uri, holder.run_id)
    seen = comparison.seen_in_training(trained) if trained is not None else set()
    return classifier_scorer(f"{name}/{holder.version}", model, size, calibration, frozenset(seen)), ""


def checkpoint_scorer(workspace: Workspace) -> tuple[Scorer | None, str]:
    """The newest best.pt under models/ as a Scorer whose labels are judged by cross-validation, or (None, why)."""
    found = sorted(workspace.models.glob(f"*/{BEST_NAME}"), key=lambda path: (path.stat().st_mtime, str(path)))
    for path in reversed(found):
        try:
            model, meta = models.load_model(path)
            calibration = read_calibration(path)
        except (models.CheckpointError, ValueError, OSError) as error:
            log.warning("review queue: checkpoint %s skipped: %s", path, error)
            continue
        name = f"checkpoint/{path.parent.name}"
        return classifier_scorer(name, model, int(meta["image_size"]), calibration, own_predictions=False), ""
    return None, NO_MODEL


def find_scorer(workspace: Workspace, uri: str, name: str, trust_pickle: bool = False) -> tuple[Scorer | None, str]:
    """The champion, else the newest trained checkpoint of the workspace; (None, why) when there is neither."""
    scorer, why_not = champion_scorer(uri, name, trust_pickle)
    if scorer is not None:
        return scorer, ""
    log.info("review queue: %s; looking for a trained checkpoint in %s", why_not, workspace.models)
    return checkpoint_scorer(workspace)


def cross_validated_p_ai(
    embedded: np.ndarray, labels: list[str], groups: list[str], folds: int = 5, seed: int = 0
) -> np.ndarray | None:
    """Out-of-sample p_ai of every row from a logistic regression on its features, cross-validated by group.

    StratifiedGroupKFold rather than plain GroupKFold: a fold must keep both labels in its training part, and with
    few AI generators GroupKFold can hold out every group of one label. When a label has fewer than two groups the
    folds split images instead (logged). None when a label has fewer than two images.
    """
    y = np.array([LABELS.index(label) for label in labels])
    counts = np.bincount(y, minlength=len(LABELS))
    if len(y) == 0 or counts.min() < 2:
        return None
    group_counts = [len({g for g, label in zip(groups, y, strict=True) if label == c}) for c in range(len(LABELS))]
    splits = min(folds, min(group_counts))
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    if splits >= 2:
        cv = StratifiedGroupKFold(splits, shuffle=True, random_state=seed)
        probabilities = cross_val_predict(model, embedded, y, groups=groups, cv=cv, method="predict_proba")
    else:
        log.info("review queue: a label has a single group; cross-validation folds split images, not groups")
        cv_images = StratifiedKFold(min(folds, int(counts.min())), shuffle=True, random_state=seed)
        probabilities = cross_val_predict(model, embedded, y, cv=cv_images, method="predict_proba")
    return probabilities[:, LABELS.index("ai")]
