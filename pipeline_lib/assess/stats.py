"""Small-sample statistics: Wilson interval, McNemar's paired test, per-generator metrics."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats
from sklearn.metrics import average_precision_score, roc_auc_score

log = logging.getLogger(__name__)

EXACT_BELOW = 25  # McNemar: exact binomial test when the discordant pairs b + c are fewer than this
GENERATOR_COLUMNS: tuple[str, ...] = (
    "generator",
    "n",
    "n_ai",
    "n_real_reference",
    "accuracy",
    "average_precision",
    "roc_auc",
)


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for k successes out of n (z = 1.96: 95%); (nan, nan) when n == 0."""
    if isinstance(k, bool) or isinstance(n, bool) or int(k) != k or int(n) != n:
        raise ValueError(f"k and n must be integers, got k={k!r}, n={n!r}")
    if n < 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if z <= 0:
        raise ValueError(f"z must be positive, got {z}")
    if n == 0:
        return math.nan, math.nan
    p = k / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class McNemarResult:
    """b: champion right and challenger wrong; c: champion wrong and challenger right (discordant pairs)."""

    b: int
    c: int
    statistic: float
    p_value: float
    exact: bool

    def verdict(self, alpha: float = 0.05) -> str:
        """Whether the two models differ by more than noise, in words."""
        return "more than noise" if self.p_value < alpha else "the difference could be noise"

    def describe(self, alpha: float = 0.05) -> str:
        """One line for the log: who wins on the discordant pairs, and whether that is more than noise."""
        test = "exact binomial" if self.exact else "chi-square, continuity-corrected"
        verdict = "significant" if self.p_value < alpha else "not significant (could be noise)"
        return (
            f"McNemar ({test}): champion-only correct {self.b}, challenger-only correct {self.c}, "
            f"p = {self.p_value:.4g}: {verdict} at alpha {alpha}"
        )


def _as_bool(values: np.ndarray | pd.Series | list, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    if array.dtype != bool:
        if not np.isin(array, (0, 1)).all():
            raise ValueError(f"{name} must hold booleans or 0/1")
        array = array.astype(bool)
    return array


def mcnemar(champion_correct: np.ndarray, challenger_correct: np.ndarray) -> McNemarResult:
    """McNemar's test on paired per-image correctness (same images, same order); two-sided.

    Exact binomial (b vs Binomial(b + c, 1/2)) when b + c < 25, else chi-square (|b - c| - 1)^2 / (b + c), 1 df.
    """
    champion = _as_bool(champion_correct, "champion_correct")
    challenger = _as_bool(challenger_correct, "challenger_correct")
    if champion.shape != challenger.shape:
        raise ValueError(f"paired arrays differ in length: {champion.size} vs {challenger.size}")
    b = int(np.sum(champion & ~challenger))
    c = int(np.sum(~champion & challenger))
    if b + c == 0:
        return McNemarResult(b, c, 0.0, 1.0, True)
    if b + c < EXACT_BELOW:
        p_value = float(scipy_stats.binomtest(b, b + c, 0.5).pvalue)
        return McNemarResult(b, c, float(min(b, c)), min(1.0, p_value), True)
    statistic = (abs(b - c) - 1) ** 2 / (b + c)
    return McNemarResult(b, c, float(statistic), float(scipy_stats.chi2.sf(statistic, df=1)), False)


def _ranking(y_true: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    if len(np.unique(y_true)) < 2:
        return math.nan, math.nan
    return float(average_precision_score(y_true, scores)), float(roc_auc_score(y_true, scores))


def per_generator_metrics(predictions: pd.DataFrame, threshold: float = 0.5) -> pd.DataFrame:
    """Accuracy, AP and ROC-AUC per generator (columns GENERATOR_COLUMNS), worst accuracy first.

    Convention: `accuracy` is over the generator's own rows (for an AI generator: the share of its images
    detected); `average_precision` and `roc_auc` rank that generator's AI images against ALL real images of the
    table (the shared negatives), so generators are comparable. Groups without AI images (e.g. 'camera'), or a
    table without real images, have NaN AP/AUC. `correct` is used when present, else p_ai >= threshold.
    Needs columns generator, label, p_ai.
    """
    missing = [c for c in ("generator", "label", "p_ai") if c not in predictions.columns]
    if missing:
        raise ValueError(f"predictions are missing columns: {', '.join(missing)} (merge the catalog's generator)")
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must be strictly between 0 and 1, got {threshold}")
    frame = predictions.reset_index(drop=True)
    labels = frame["label"].astype(str)
    bad = sorted(set(labels) - {"real", "ai"})
    if bad:
        raise ValueError(f"label must be real or ai, got {bad}")
    is_ai = (labels == "ai").to_numpy()
    scores = frame["p_ai"].to_numpy(dtype=np.float64)
    if "correct" in frame.columns:
        correct = frame["correct"].to_numpy(dtype=bool)
    else:
        correct = (scores >= threshold) == is_ai
    generator = frame["generator"].astype("string").fillna("").replace("", "unknown").to_numpy()
    real_scores = scores[~is_ai]
    rows = []
    for name in sorted(set(generator)):
        own = generator == name
        ai_scores = scores[own & is_ai]
        y = np.r_[np.ones(ai_scores.size), np.zeros(real_scores.size)]
        ap, auc = _ranking(y, np.r_[ai_scores, real_scores]) if ai_scores.size else (math.nan, math.nan)
        rows.append(
            {
                "generator": name,
                "n": int(own.sum()),
                "n_ai": int(ai_scores.size),
                "n_real_reference": int(real_scores.size),
                "accuracy": float(correct[own].mean()),
                "average_precision": ap,
                "roc_auc": auc,
            }
        )
    table = pd.DataFrame(rows, columns=list(GENERATOR_COLUMNS))
    return table.sort_values(["accuracy", "n", "generator"], ascending=[True, False, True]).reset_index(drop=True)
