"""Calibrated output: temperature scaling fitted on the validation split, ECE, and the ai / real / uncertain verdict.

Inputs are either logits shaped (N, 2) (class order real, ai) or p_ai shaped (N,). For two classes, softmax
temperature scaling equals scaling the margin logit(p_ai) = l_ai - l_real, so both forms share one code path.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from scipy.special import expit, log_expit

log = logging.getLogger(__name__)

LOG_T_BOUNDS = (math.log(0.05), math.log(20.0))  # temperatures searched
# A fitted temperature is used only inside this range: T far below 1 comes from a validation split the model
# separates perfectly (the NLL keeps falling as T -> 0, p_ai collapses to 0/1), T far above 1 from a model that
# knows nothing; neither says how to rescale scores on new images.
TEMPERATURE_RANGE = (0.2, 10.0)
_EPS = 1e-7
VERDICTS: tuple[str, ...] = ("real", "uncertain", "ai")


def _margins(scores: np.ndarray) -> np.ndarray:
    """Logit margin l_ai - l_real from (N, 2) logits, or logit(p_ai) from (N,) probabilities."""
    array = np.asarray(scores, dtype=np.float64)
    if array.ndim == 2 and array.shape[1] == 2:
        margins = array[:, 1] - array[:, 0]
    elif array.ndim == 1:
        if array.size and (np.isnan(array).any() or array.min() < 0 or array.max() > 1):
            raise ValueError("1-D input must be p_ai probabilities in [0, 1]; pass logits as an (N, 2) array")
        clipped = np.clip(array, _EPS, 1 - _EPS)
        margins = np.log(clipped) - np.log1p(-clipped)
    else:
        raise ValueError(f"expected logits (N, 2) or p_ai (N,), got shape {array.shape}")
    if not np.isfinite(margins).all():
        raise ValueError("logits must be finite")
    return margins


def _binary(labels: np.ndarray | list, n: int) -> np.ndarray:
    values = np.asarray(labels)
    if values.shape != (n,):
        raise ValueError(f"labels must be 1-D with {n} entries, got shape {values.shape}")
    if values.dtype.kind in "OUS":
        bad = sorted({str(v) for v in values} - {"real", "ai"})
        if bad:
            raise ValueError(f"labels must be 'real'/'ai' or 0/1, got {bad}")
        return (values == "ai").astype(np.float64)
    if not np.isin(values, (0, 1)).all():
        raise ValueError("labels must be 'real'/'ai' or 0/1")
    return values.astype(np.float64)


def _nll(margins: np.ndarray, y: np.ndarray, temperature: float) -> float:
    scaled = margins / temperature
    return float(-np.mean(y * log_expit(scaled) + (1 - y) * log_expit(-scaled)))


def fit_temperature(scores: np.ndarray, labels: np.ndarray | list) -> float:
    """Temperature T > 0 minimising the validation NLL of sigmoid(margin / T) (bounded search on log T)."""
    from scipy.optimize import minimize_scalar  # only a fit needs it (a quarter second to import)

    margins = _margins(scores)
    y = _binary(labels, margins.size)
    if margins.size == 0:
        raise ValueError("cannot fit a temperature on an empty validation split")
    if len(np.unique(y)) < 2:
        log.warning("temperature scaling on one class only: the fitted T just pushes p towards that class")
    result = minimize_scalar(
        lambda log_t: _nll(margins, y, math.exp(log_t)), bounds=LOG_T_BOUNDS, method="bounded", options={"xatol": 1e-5}
    )
    temperature = float(math.exp(result.x))
    log.info("temperature scaling: T=%.4f (NLL %.4f -> %.4f)", temperature, _nll(margins, y, 1.0), result.fun)
    return temperature


@dataclass(frozen=True)
class TemperatureFit:
    """The temperature to use (1.0 when none could be trusted) and why it was not fitted ("" when it was)."""

    temperature: float
    reason: str = ""


def fit_bounded_temperature(scores: np.ndarray, labels: np.ndarray | list, min_images: int) -> TemperatureFit:
    """fit_temperature, trusted only with >= min_images validation images of both classes and a result inside
    TEMPERATURE_RANGE; otherwise T = 1 and the reason."""
    margins = _margins(scores)
    y = _binary(labels, margins.size)
    if margins.size < min_images:
        return TemperatureFit(1.0, f"only {margins.size} validation images (calibration.min_val_images={min_images})")
    if len(np.unique(y)) < 2:
        return TemperatureFit(1.0, "the validation split holds one class only")
    temperature = fit_temperature(scores, labels)
    problem = temperature_problem(temperature)
    if problem:
        low = TEMPERATURE_RANGE[0]
        why = "separates the validation split perfectly" if temperature < low else "barely tells the classes apart"
        return TemperatureFit(1.0, f"the fitted {problem} (the model {why})")
    return TemperatureFit(temperature)


def temperature_problem(temperature: float) -> str:
    """Why a temperature must not rescale scores ("" when it may): it is not a number inside TEMPERATURE_RANGE.

    The one bound of every temperature: a fitted one outside it is replaced by T = 1, a stored one read back
    (check_temperature) is refused.
    """
    low, high = TEMPERATURE_RANGE
    if math.isfinite(temperature) and low <= temperature <= high:
        return ""
    return f"T={temperature:.3g} is outside {low:g}..{high:g}"


def check_temperature(temperature: float, where: str) -> float:
    """The temperature of a stored calibration (where: the file or tag it came from), or ValueError naming both."""
    problem = temperature_problem(temperature)
    if problem:
        raise ValueError(
            f"{where}: temperature {problem}; aidetect never stores such a temperature (a fit outside that range "
            "gives T = 1), so the calibration was edited or damaged: fix or remove it"
        )
    return temperature


def apply_temperature(scores: np.ndarray, temperature: float) -> np.ndarray:
    """Calibrated p_ai = sigmoid(margin / T) for (N, 2) logits or (N,) p_ai."""
    if not temperature > 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    return expit(_margins(scores) / temperature)


def expected_calibration_error(p_ai: np.ndarray, labels: np.ndarray | list, bins: int = 10) -> float:
    """ECE with equal-width bins (the same definition the evaluation report uses)."""
    from pipeline_lib.assess.evaluate import expected_calibration_error as _ece  # evaluate imports torch and sklearn

    probabilities = np.asarray(p_ai, dtype=np.float64)
    return _ece(_binary(labels, probabilities.size), probabilities, bins)


def _check_band(uncertain_low: float, uncertain_high: float) -> None:
    if not 0 < uncertain_low < uncertain_high < 1:
        raise ValueError(f"need 0 < uncertain_low < uncertain_high < 1, got {uncertain_low} and {uncertain_high}")


def verdict(p_ai: float, uncertain_low: float, uncertain_high: float) -> str:
    """'ai' when p_ai >= uncertain_high, 'real' when p_ai <= uncertain_low, else 'uncertain'."""
    _check_band(uncertain_low, uncertain_high)
    if not 0 <= p_ai <= 1:
        raise ValueError(f"p_ai must be in [0, 1], got {p_ai}")
    if p_ai >= uncertain_high:
        return "ai"
    if p_ai <= uncertain_low:
        return "real"
    return "uncertain"


def verdicts(p_ai: np.ndarray, uncertain_low: float, uncertain_high: float) -> np.ndarray:
    """verdict() for an array of p_ai (object array of strings)."""
    _check_band(uncertain_low, uncertain_high)
    values = np.asarray(p_ai, dtype=np.float64)
    if values.size and (np.isnan(values).any() or values.min() < 0 or values.max() > 1):
        raise ValueError("p_ai must be probabilities in [0, 1] without NaN")
    out = np.full(values.shape, "uncertain", dtype=object)
    out[values >= uncertain_high] = "ai"
    out[values <= uncertain_low] = "real"
    return out
