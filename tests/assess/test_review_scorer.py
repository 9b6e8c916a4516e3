"""Tests for pipeline_lib.assess.review_scorer: which model scores the queue, and cross-validated label checks."""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from pipeline_lib.assess import review_scorer
from pipeline_lib.assess.predict import ModelCalibration, write_calibration
from pipeline_lib.assess.registry import register_model
from pipeline_lib.core.config import NormalizeConfig
from pipeline_lib.core.tracking.logged_models import log_pytorch_model
from pipeline_lib.core.tracking.runs import start_run
from pipeline_lib.core.tracking.store import tracking_uri
from pipeline_lib.core.workspace import Workspace, file_sha256
from pipeline_lib.learn import models

SIZE = 16


def constant_classifier(real_bias: float, ai_bias: float) -> models.Classifier:
    """A resnet18 whose head ignores the image: always ai (ai_bias > real_bias) or always real."""
    torch.manual_seed(0)
    model = models.Classifier("resnet18")
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(torch.tensor([real_bias, ai_bias]))
    return model.eval()


def register_champion(
    workspace: Workspace,
    uri: str,
    name: str = "aidetect",
    ai_bias: float = 5.0,
    calibration: ModelCalibration | None = None,
) -> str:
    """Register a constant resnet18 (input SIZE) as the champion of name in uri, as the pipeline logs models (its
    state_dict inside); its version."""
    model = constant_classifier(0.0, ai_bias)
    checkpoint = workspace.root / "champion-checkpoint" / "best.pt"
    models.save_checkpoint(checkpoint, model, {"image_size": SIZE})
    tracker = start_run(uri, "aidetect", workspace, "champion", {"aidetect.kind": "test"})
    example = np.random.default_rng(0).random((1, 3, SIZE, SIZE), dtype=np.float32)
    model_uri = log_pytorch_model(tracker, model, example, [], checkpoint=checkpoint)
    text = json.dumps((calibration or ModelCalibration()).as_dict())
    decision = register_model(
        tracker,
        model_uri,
        name,
        0.9,
        "t",
        file_sha256(checkpoint),
        image_size=SIZE,
        calibration=text,
        architecture="resnet18",
    )
    assert decision.promoted, decision
    return decision.version


def test_without_any_model_there_is_no_scorer_and_the_reason_is_given(workspace: Workspace) -> None:
    uri = tracking_uri(None, workspace)
    scorer, why = review_scorer.find_scorer(workspace, uri, "aidetect")
    assert scorer is None and why == review_scorer.NO_MODEL
    assert not (workspace.root / "mlflow.db").exists(), "looking for a champion must not create a tracking store"


def test_the_champion_scores_with_its_calibration_and_its_own_predictions(workspace: Workspace) -> None:
    uri = tracking_uri(None, workspace)
    policy = NormalizeConfig(mode="jpeg", quality=80)
    version = register_champion(workspace, uri, calibration=ModelCalibration(2.0, policy))
    scorer, why = review_scorer.find_scorer(workspace, uri, "aidetect")
    assert why == "" and scorer is not None
    assert scorer.name == f"aidetect/{version}" and scorer.reviewer == f"model:aidetect/{version}"
    identity = scorer.extractor.identity
    assert scorer.own_predictions and identity["image_size"] == str(SIZE) and '"quality": 80' in identity["normalize"]
    p_ai = scorer.p_ai(np.zeros((2, 512), dtype=np.float32))
    np.testing.assert_allclose(p_ai, 1 / (1 + np.exp(-5.0 / 2.0)), err_msg="logit margin over the temperature")


def test_without_a_champion_the_newest_checkpoint_embeds_and_labels_are_cross_validated(workspace: Workspace) -> None:
    old, new = workspace.models / "aaaa" / "best.pt", workspace.models / "bbbb" / "best.pt"
    models.save_checkpoint(old, constant_classifier(1.0, 0.0), {"image_size": SIZE})
    models.save_checkpoint(new, constant_classifier(0.0, 1.0), {"image_size": 24})
    write_calibration(new, ModelCalibration(1.5))
    (workspace.models / "cccc").mkdir()
    (workspace.models / "cccc" / "best.pt").write_bytes(b"not a checkpoint")
    os.utime(old, (1, 1))
    scorer, why = review_scorer.find_scorer(workspace, tracking_uri(None, workspace), "aidetect")
    assert scorer is not None and why == ""
    assert scorer.name == "checkpoint/bbbb" and scorer.extractor.identity["image_size"] == "24"
    assert not scorer.own_predictions and scorer.p_ai is None, "a checkpoint that is not the champion only embeds"


def test_cross_validated_probabilities_follow_the_features_and_hold_out_whole_groups() -> None:
    rng = np.random.default_rng(0)
    labels = ["real"] * 30 + ["ai"] * 30
    groups = [f"p{i // 3}" for i in range(60)]
    features = rng.normal(size=(60, 8)) + np.array([[4.0] + [0] * 7 if label == "ai" else [0] * 8 for label in labels])
    features[5] += np.array([4.0] + [0] * 7)  # a "real" image that looks like the AI ones
    p_ai = review_scorer.cross_validated_p_ai(features, labels, groups)
    assert p_ai is not None and p_ai.shape == (60,)
    assert np.mean(p_ai[30:]) > 0.7 > 0.3 > np.mean(p_ai[:5]), p_ai
    assert p_ai[5] > 0.5, "the odd one is judged by models that never saw its group"
    single = review_scorer.cross_validated_p_ai(features, labels, ["one"] * 30 + ["other"] * 30)
    assert single is not None and np.mean(single[30:]) > 0.6 > 0.4 > np.mean(single[:5]), "folds split images"
    assert review_scorer.cross_validated_p_ai(features[:31], labels[:31], groups[:31]) is None, "one ai image"
