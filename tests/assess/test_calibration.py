"""Temperature scaling lowers ECE of an over-confident toy model; the uncertain band."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline_lib.assess.calibration import (
    TEMPERATURE_RANGE,
    apply_temperature,
    check_temperature,
    expected_calibration_error,
    fit_bounded_temperature,
    fit_temperature,
    temperature_problem,
    verdict,
    verdicts,
)
from pipeline_lib.core.config import CalibrationConfig, ConfigError
from pipeline_lib.core.config_loader import build_config


def toy(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels and calibrated margins from a logistic model, then logits scaled x5 (over-confident)."""
    rng = np.random.default_rng(seed)
    margin = rng.normal(0.0, 1.5, n)
    labels = (rng.random(n) < 1 / (1 + np.exp(-margin))).astype(int)
    logits = np.stack([np.zeros(n), 5.0 * margin], axis=1)
    return logits, labels


def test_temperature_scaling_lowers_ece_of_an_overconfident_model() -> None:
    val_logits, val_labels = toy(2000, seed=0)
    test_logits, test_labels = toy(2000, seed=1)
    temperature = fit_temperature(val_logits, val_labels)
    assert temperature == pytest.approx(5.0, rel=0.15)
    before = expected_calibration_error(apply_temperature(test_logits, 1.0), test_labels)
    after = expected_calibration_error(apply_temperature(test_logits, temperature), test_labels)
    assert before > 0.1 and after < 0.04 and after < before / 3


def test_a_temperature_needs_enough_validation_images_and_stays_in_range() -> None:
    logits, labels = toy(2000, seed=0)
    assert fit_bounded_temperature(logits, labels, 30).temperature == pytest.approx(5.0, rel=0.15)
    # 16 images the model separates perfectly: the raw fit runs to the edge of its search (T -> 0)
    separable = np.stack([np.zeros(16), np.where(np.arange(16) % 2, 4.0, -4.0)], axis=1)
    halves = np.arange(16) % 2
    assert fit_temperature(separable, halves) < 0.1, "the unbounded fit would print p_ai like 1e-28"
    few = fit_bounded_temperature(separable, halves, 30)
    assert few.temperature == 1.0 and "only 16 validation images" in few.reason and "min_val_images=30" in few.reason
    many = fit_bounded_temperature(np.tile(separable, (4, 1)), np.tile(halves, 4), 30)
    assert many.temperature == 1.0 and "outside 0.2..10" in many.reason and "separates" in many.reason
    one_class = fit_bounded_temperature(logits[:50], np.ones(50, dtype=int), 30)
    assert one_class.temperature == 1.0 and "one class" in one_class.reason


@pytest.mark.parametrize("temperature", [1e-12, 0.19, 10.5, 1e12, float("nan"), float("inf"), 0.0, -2.0])
def test_a_stored_temperature_is_bounded_like_a_fitted_one(temperature: float) -> None:
    assert temperature_problem(temperature), f"T={temperature} must be refused"
    with pytest.raises(ValueError, match=r"best\.calibration\.json: temperature T=.* is outside 0\.2\.\.10"):
        check_temperature(temperature, "calibration file best.calibration.json")


def test_temperatures_inside_the_range_pass_both_ways() -> None:
    low, high = TEMPERATURE_RANGE
    for temperature in (low, 1.0, 4.0, high):
        assert temperature_problem(temperature) == "" and check_temperature(temperature, "x") == temperature


def test_p_ai_input_gives_the_same_temperature_as_logits() -> None:
    logits, labels = toy(500, seed=2)
    logits = logits / 2.5  # margins within float64 sigmoid precision, so p_ai -> margin is lossless
    p_ai = apply_temperature(logits, 1.0)
    string_labels = np.where(labels == 1, "ai", "real")
    assert fit_temperature(p_ai, string_labels) == pytest.approx(fit_temperature(logits, labels), rel=1e-3)
    assert np.allclose(apply_temperature(p_ai, 1.0), p_ai, atol=1e-6)


def test_input_errors() -> None:
    with pytest.raises(ValueError, match="p_ai probabilities"):
        fit_temperature(np.array([2.0, -1.0]), [1, 0])
    with pytest.raises(ValueError, match="shape"):
        apply_temperature(np.zeros((3, 3)), 1.0)
    with pytest.raises(ValueError, match="positive"):
        apply_temperature(np.zeros((3, 2)), 0.0)
    with pytest.raises(ValueError, match="labels must be"):
        fit_temperature(np.zeros((2, 2)), ["ai", "fake"])
    with pytest.raises(ValueError, match="empty"):
        fit_temperature(np.zeros((0, 2)), np.zeros(0, dtype=int))


def test_verdict_band() -> None:
    assert [verdict(p, 0.35, 0.65) for p in (0.0, 0.35, 0.36, 0.5, 0.64, 0.65, 1.0)] == [
        "real",
        "real",
        "uncertain",
        "uncertain",
        "uncertain",
        "ai",
        "ai",
    ]
    assert verdicts(np.array([0.1, 0.5, 0.9]), 0.35, 0.65).tolist() == ["real", "uncertain", "ai"]
    with pytest.raises(ValueError, match="uncertain_low < uncertain_high"):
        verdict(0.5, 0.7, 0.3)
    with pytest.raises(ValueError, match="p_ai"):
        verdict(1.5, 0.35, 0.65)


def test_calibration_config() -> None:
    config = build_config({})
    assert config.calibration == CalibrationConfig(temperature_scaling=True, uncertain_low=0.35, uncertain_high=0.65)
    with pytest.raises(ConfigError, match="uncertain_low"):
        build_config({"calibration": {"uncertain_low": 0.7, "uncertain_high": 0.6}})
