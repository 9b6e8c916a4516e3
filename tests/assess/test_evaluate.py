"""Tests for pipeline_lib.assess.evaluate: probabilities, predictions table and metrics."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from pipeline_lib.assess.evaluate import (
    PREDICTION_COLUMNS,
    calibration_bins,
    compute_metrics,
    expected_calibration_error,
    generator_metrics,
    per_group_accuracy,
    predict_logits,
    predict_probabilities,
    predictions_table,
    rescore_accuracy,
    robustness_metrics,
    softmax_p_ai,
)
from pipeline_lib.learn.normalize import ROBUSTNESS_VARIANTS
from tests.assess.conftest import make_rows
from tests.conftest import TinyClassifier


def test_metrics_match_hand_computed_values(hand_predictions: pd.DataFrame) -> None:
    metrics = compute_metrics(hand_predictions, threshold=0.5, n_bootstrap=200)
    expected = {
        "accuracy": 0.7,
        "tp": 4.0,
        "fn": 1.0,
        "fp": 2.0,
        "tn": 3.0,
        "precision_ai": 4 / 6,
        "recall_ai": 4 / 5,
        "f1_ai": 8 / 11,
        "precision_real": 3 / 4,
        "recall_real": 3 / 5,
        "f1_real": 2 / 3,
        "roc_auc": 22 / 25,  # ai-over-real pairs ranked right: 5 + 5 + 5 + 4 + 3 of 25
        "average_precision": (1 + 1 + 1 + 4 / 5 + 5 / 7) / 5,  # precision at each ai hit in the ranking
        "n_test": 10.0,
        "threshold": 0.5,
    }
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value), f"{name}: expected {value}, got {metrics[name]}"
    not_float = {k: type(v).__name__ for k, v in metrics.items() if type(v) is not float}
    assert not_float == {}, f"metrics must be plain floats (MLflow-loggable): {not_float}"


def test_metrics_rederive_decision_from_threshold(hand_predictions: pd.DataFrame) -> None:
    metrics = compute_metrics(hand_predictions, threshold=0.62, n_bootstrap=0)
    # At 0.62: ai 0.9 0.8 0.7 -> tp 3, fn 2; real 0.65 -> fp 1, tn 4.
    got = (metrics["tp"], metrics["fn"], metrics["fp"], metrics["tn"])
    assert got == (3.0, 2.0, 1.0, 4.0), f"confusion entries at threshold 0.62 wrong: {got}"
    assert math.isnan(metrics["accuracy_ci_low"]), "n_bootstrap=0 should give a nan interval, not a fake one"


def test_bootstrap_interval_contains_accuracy_and_is_seeded(hand_predictions: pd.DataFrame) -> None:
    first = compute_metrics(hand_predictions, threshold=0.5, n_bootstrap=500, seed=7)
    again = compute_metrics(hand_predictions, threshold=0.5, n_bootstrap=500, seed=7)
    low, high = first["accuracy_ci_low"], first["accuracy_ci_high"]
    assert low <= first["accuracy"] <= high, f"interval [{low}, {high}] misses accuracy {first['accuracy']}"
    assert 0.0 <= low < high <= 1.0, f"interval [{low}, {high}] should be a proper sub-range of [0, 1]"
    assert (again["accuracy_ci_low"], again["accuracy_ci_high"]) == (low, high), "same seed gave another interval"


def test_single_class_test_set_gives_nan_auc_without_crashing() -> None:
    rows = make_rows(["ai"] * 4)
    predictions = predictions_table(rows, np.array([0.9, 0.8, 0.4, 0.7]), threshold=0.5)
    metrics = compute_metrics(predictions, threshold=0.5, n_bootstrap=50)
    assert math.isnan(metrics["roc_auc"]), f"roc_auc with one class should be nan, got {metrics['roc_auc']}"
    assert math.isnan(metrics["average_precision"]), "average_precision with one class should be nan"
    assert metrics["accuracy"] == pytest.approx(0.75), f"accuracy should still be 3/4, got {metrics['accuracy']}"
    assert metrics["precision_real"] == 0.0, "precision of a class never predicted correctly should be 0, not an error"


def test_compute_metrics_rejects_empty_and_bad_threshold(hand_predictions: pd.DataFrame) -> None:
    with pytest.raises(ValueError, match="empty test set"):
        compute_metrics(hand_predictions.head(0), threshold=0.5)
    with pytest.raises(ValueError, match="threshold"):
        compute_metrics(hand_predictions, threshold=1.5)


def test_predictions_table_columns_rule_and_no_mutation() -> None:
    rows = make_rows(["ai", "real", "ai"]).set_index(pd.Index([10, 20, 30]))
    before = rows.copy()
    table = predictions_table(rows, np.array([0.5, 0.49, 0.1]), threshold=0.5)
    assert tuple(table.columns) == PREDICTION_COLUMNS, f"unexpected columns {list(table.columns)}"
    assert list(table["predicted"]) == ["ai", "real", "real"], "p_ai >= threshold must mean ai"
    assert list(table["correct"]) == [True, True, False], f"correct column wrong: {list(table['correct'])}"
    pd.testing.assert_frame_equal(rows, before, obj="predictions_table mutated its input")
    with pytest.raises(ValueError, match="one value per test row"):
        predictions_table(rows, np.array([0.5, 0.5]), threshold=0.5)


def test_per_group_accuracy_sorted_worst_first() -> None:
    groups = ["A", "A", "B", "B", "B", "C", "D", "D", "D", "D"]
    labels = ["ai", "ai", "real", "real", "real", "ai", "real", "real", "real", "real"]
    scores = [0.9, 0.1, 0.1, 0.2, 0.3, 0.2, 0.9, 0.8, 0.1, 0.2]
    predictions = predictions_table(make_rows(labels, groups), np.array(scores), threshold=0.5)
    table = per_group_accuracy(predictions)
    assert list(table.columns) == ["group", "label", "n", "accuracy"], f"unexpected columns {list(table.columns)}"
    # C: 0/1, then the two 0.5 groups (larger D before A), then B: 3/3.
    assert list(table["group"]) == ["C", "D", "A", "B"], f"groups not sorted worst first: {list(table['group'])}"
    assert list(table["n"]) == [1, 4, 2, 3], f"group sizes wrong: {list(table['n'])}"
    assert list(table["accuracy"]) == [0.0, 0.5, 0.5, 1.0], f"group accuracies wrong: {list(table['accuracy'])}"


def test_predict_probabilities_matches_softmax_and_restores_model() -> None:
    torch.manual_seed(0)
    model = TinyClassifier().train()
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    p_small = predict_probabilities(model, images, batch_size=2)
    p_big = predict_probabilities(model, images, batch_size=64)
    model.eval()
    with torch.no_grad():
        expected = torch.softmax(model(images.float() / 255.0), dim=1)[:, 1].numpy()
    assert p_small.shape == (5,), f"expected one p_ai per image, got shape {p_small.shape}"
    np.testing.assert_allclose(p_small, expected, rtol=1e-5, atol=1e-6, err_msg="p_ai is not softmax(logits)[:,1]")
    np.testing.assert_allclose(p_small, p_big, rtol=1e-5, atol=1e-6, err_msg="p_ai depends on batch size")
    model.train()
    predict_probabilities(model, images[:1])
    assert model.training, "predict_probabilities must give the model back in the mode it was in"


def test_predict_probabilities_rejects_float_images() -> None:
    with pytest.raises(ValueError, match="uint8"):
        predict_probabilities(TinyClassifier(), torch.rand(2, 3, 32, 32))


def test_ece_matches_hand_computed_values(hand_predictions: pd.DataFrame) -> None:
    # 10 bins, |share of ai - mean p_ai| per filled bin, weighted by bin size (n = 10):
    #   0.05 r: .05 | 0.1 r: .1 | 0.2 r: .2 | 0.3 a: .7 | 0.55 r: .55 | 0.6 a + 0.65 r: |.5 - .625| x2
    #   0.7 a: .3 | 0.8 a: .2 | 0.9 a: .1   -> (0.05+0.1+0.2+0.7+0.55+0.25+0.3+0.2+0.1) / 10 = 0.245
    metrics = compute_metrics(hand_predictions, threshold=0.5, n_bootstrap=0)
    assert metrics["ece"] == pytest.approx(0.245), f"ECE with 10 bins should be 0.245, got {metrics['ece']}"
    y_true = (hand_predictions["label"] == "ai").to_numpy()
    scores = hand_predictions["p_ai"].to_numpy()
    # 2 bins: [0, .5): 0.3 a, 0.2 0.1 0.05 r -> |.25 - .1625| x 4/10; [.5, 1]: 4 a of 6, mean .7 -> |2/3 - .7| x 6/10
    two = expected_calibration_error(y_true, scores, n_bins=2)
    assert two == pytest.approx(0.0875 * 0.4 + (0.7 - 2 / 3) * 0.6), f"ECE with 2 bins wrong: {two}"
    bins = calibration_bins(y_true, scores, n_bins=10)
    assert list(bins["count"]) == [1, 1, 1, 1, 0, 1, 2, 1, 1, 1], f"bin counts wrong: {list(bins['count'])}"
    assert math.isnan(bins.loc[4, "mean_p_ai"]), "an empty bin has no mean"


def test_ece_is_zero_for_certain_right_answers_and_one_for_certain_wrong_ones() -> None:
    truth = np.array([1, 1, 0, 0])
    certain = np.array([1.0, 1.0, 0.0, 0.0])
    assert expected_calibration_error(truth, certain) == 0.0, "p_ai = 1 must fall in the last bin"
    assert expected_calibration_error(truth, np.array([0.0, 0.0, 1.0, 1.0])) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="n_bins"):
        expected_calibration_error(truth, np.array([0.5] * 4), n_bins=0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        expected_calibration_error(truth, np.array([0.5, 0.5, 0.5, 1.5]))


def test_rescore_accuracy_scores_a_model_on_rows(hand_predictions: pd.DataFrame) -> None:
    torch.manual_seed(0)
    model = TinyClassifier().eval()
    images = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
    p_ai = predict_probabilities(model, images)
    expected = float(((p_ai >= 0.5) == (hand_predictions["label"] == "ai").to_numpy()).mean())
    got = rescore_accuracy(model, images, hand_predictions, threshold=0.5, batch_size=3)
    assert got == pytest.approx(expected), f"re-scored accuracy {got} != accuracy of the model's own p_ai {expected}"


class HighFrequencyModel(nn.Module):
    """logit margin (ai - real) = 40 * (mean |horizontal pixel difference| - 0.1): noise reads as ai."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        energy = (x[..., 1:] - x[..., :-1]).abs().mean(dim=(1, 2, 3))
        margin = 40.0 * (energy - 0.1)
        return torch.stack([-margin / 2, margin / 2], dim=1)


def _noise_and_flat(n: int = 6, size: int = 32) -> tuple[torch.Tensor, list[str]]:
    generator = torch.Generator().manual_seed(0)
    noisy = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator)
    flat = (
        torch.full((n, 3, size, size), 128, dtype=torch.uint8) + torch.arange(n, dtype=torch.uint8)[:, None, None, None]
    )
    return torch.cat([noisy, flat]), ["ai"] * n + ["real"] * n


def test_wilson_interval_next_to_bootstrap(hand_predictions: pd.DataFrame) -> None:
    metrics = compute_metrics(hand_predictions, threshold=0.5, n_bootstrap=200)
    # 7 of 10 right: the Wilson 95% interval is (0.3968, 0.8922) (textbook value).
    assert metrics["accuracy_wilson_low"] == pytest.approx(0.396773, abs=1e-5), metrics
    assert metrics["accuracy_wilson_high"] == pytest.approx(0.892211, abs=1e-5), metrics
    assert metrics["accuracy_ci_low"] <= metrics["accuracy"] <= metrics["accuracy_ci_high"]


def test_predict_logits_match_probabilities() -> None:
    images, _ = _noise_and_flat(3)
    logits = predict_logits(HighFrequencyModel(), images, batch_size=4)
    assert logits.shape == (6, 2)
    assert np.allclose(softmax_p_ai(logits), predict_probabilities(HighFrequencyModel(), images))


def test_robustness_metrics_on_a_tiny_model() -> None:
    images, labels = _noise_and_flat()
    model = HighFrequencyModel()
    clean = predictions_table(make_rows(labels), predict_probabilities(model, images), 0.5)
    assert clean["correct"].all(), "the toy model separates noise from flat images"
    # Stand-ins for preprocess.degraded_tensors: every variant blurs away the noise the model looks at, except
    # "identity", which returns the clean images.
    smooth = torch.nn.functional.avg_pool2d(images.float(), 3, stride=1, padding=1).round().to(torch.uint8)
    asked: list[str] = []

    def load_variant(name: str) -> torch.Tensor:
        asked.append(name)
        return images if name == "identity" else smooth

    metrics = robustness_metrics(model, load_variant, labels, threshold=0.5)
    assert asked == list(ROBUSTNESS_VARIANTS), "each variant's images are loaded once, in order"
    assert set(metrics) == {f"robust.{v}.{m}" for v in ROBUSTNESS_VARIANTS for m in ("accuracy", "roc_auc")}
    assert all(0.0 <= value <= 1.0 for value in metrics.values()), metrics
    assert metrics["robust.downscale50.accuracy"] < 1.0, "the smoothed images lose the noise the model looks at"
    same = robustness_metrics(model, load_variant, labels, 0.5, variants=["identity"])
    assert same == {"robust.identity.accuracy": 1.0, "robust.identity.roc_auc": 1.0}
    with pytest.raises(ValueError, match="one entry per image"):
        robustness_metrics(model, load_variant, labels[:-1], 0.5)


def test_per_generator_metrics_from_the_predictions_table() -> None:
    rows = make_rows(["ai", "ai", "ai", "ai", "real", "real", "real"])
    rows["generator"] = ["midjourney", "midjourney", "sd", "sd", "camera", "camera", ""]
    table = predictions_table(rows, np.array([0.9, 0.8, 0.4, 0.7, 0.2, 0.6, 0.1]), 0.5, p_ai_raw=np.full(7, 0.5))
    assert list(table["generator"]) == ["midjourney", "midjourney", "sd", "sd", "camera", "camera", "unknown"]
    assert (table["p_ai_raw"] == 0.5).all() and table["p_ai"].iloc[0] == 0.9
    assert predictions_table(make_rows(["ai"]), np.array([0.9]), 0.5)["generator"].tolist() == ["unknown"]
    metrics, per_generator = generator_metrics(table, 0.5)
    assert metrics["generator.midjourney.accuracy"] == 1.0 and metrics["generator.sd.accuracy"] == 0.5
    # sd's AI scores 0.4, 0.7 against all real scores 0.2, 0.6, 0.1: 5 of 6 pairs ranked right.
    assert metrics["generator.sd.roc_auc"] == pytest.approx(5 / 6)
    assert metrics["generator.midjourney.ap"] == pytest.approx(1.0)
    assert metrics["generator.camera.accuracy"] == 0.5 and math.isnan(metrics["generator.camera.roc_auc"])
    assert per_generator.iloc[0]["accuracy"] <= per_generator.iloc[-1]["accuracy"], "worst first"
