"""Wilson and McNemar against hand-computed values; per-generator metrics on a small table."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from pipeline_lib.assess.stats import GENERATOR_COLUMNS, mcnemar, per_generator_metrics, wilson_interval


def test_wilson_matches_hand_computed_values() -> None:
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)
    assert wilson_interval(10, 10)[1] == 1.0 and wilson_interval(10, 10)[0] == pytest.approx(0.7225, abs=1e-4)
    assert all(math.isnan(v) for v in wilson_interval(0, 0))
    with pytest.raises(ValueError, match="0 <= k <= n"):
        wilson_interval(11, 10)
    with pytest.raises(ValueError, match="integers"):
        wilson_interval(1.5, 10)  # type: ignore[arg-type]


def _pairs(both: int, b: int, c: int, neither: int) -> tuple[np.ndarray, np.ndarray]:
    champion = [True] * both + [True] * b + [False] * c + [False] * neither
    challenger = [True] * both + [False] * b + [True] * c + [False] * neither
    return np.array(champion), np.array(challenger)


def test_mcnemar_exact_for_few_discordant_pairs() -> None:
    result = mcnemar(*_pairs(50, 10, 2, 5))
    assert (result.b, result.c, result.exact) == (10, 2, True)
    assert result.p_value == pytest.approx(158 / 4096, abs=1e-6)  # 2 * (1 + 12 + 66) / 2^12 = 0.0386
    assert "significant at alpha" in result.describe()


def test_mcnemar_chi_square_with_continuity_correction() -> None:
    result = mcnemar(*_pairs(10, 20, 10, 0))
    assert not result.exact and result.statistic == pytest.approx(81 / 30)  # (|20 - 10| - 1)^2 / 30 = 2.7
    assert result.p_value == pytest.approx(0.10035, abs=1e-4)
    assert "not significant" in result.describe()


def test_mcnemar_edge_cases_and_errors() -> None:
    same = mcnemar([1, 0, 1], [1, 0, 1])
    assert (same.b, same.c, same.p_value) == (0, 0, 1.0)
    with pytest.raises(ValueError, match="differ in length"):
        mcnemar([1, 0], [1, 0, 1])
    with pytest.raises(ValueError, match="booleans or 0/1"):
        mcnemar([2, 0], [1, 0])


def test_per_generator_metrics_on_a_small_table() -> None:
    table = pd.DataFrame(
        {
            "generator": ["camera", "camera", "camera", "camera", "sd", "sd", "sd", "mj", "mj", ""],
            "label": ["real", "real", "real", "real", "ai", "ai", "ai", "ai", "ai", "ai"],
            "p_ai": [0.1, 0.2, 0.6, 0.3, 0.9, 0.8, 0.7, 0.5, 0.25, 0.95],
        }
    )
    result = per_generator_metrics(table).set_index("generator")
    assert list(result.reset_index().columns) == list(GENERATOR_COLUMNS)
    assert set(result.index) == {"camera", "sd", "mj", "unknown"}
    # camera (real only): 3 of 4 correct at threshold 0.5; no AI images -> NaN ranking metrics
    assert result.loc["camera", "accuracy"] == 0.75 and math.isnan(result.loc["camera", "roc_auc"])
    # sd: all three AI scores above every real score
    assert result.loc["sd", "roc_auc"] == 1.0 and result.loc["sd", "average_precision"] == 1.0
    assert result.loc["sd", "accuracy"] == 1.0 and result.loc["sd", "n_real_reference"] == 4
    # mj: 0.5 beats 3 of the 4 reals (not 0.6), 0.25 beats 2 of 4 -> AUC (3 + 2) / 8; accuracy 1 of 2
    assert result.loc["mj", "roc_auc"] == pytest.approx(0.625) and result.loc["mj", "accuracy"] == 0.5
    # AP for mj: ranking 0.6(real) 0.5(ai) 0.3 0.25(ai) ... -> precisions 1/2 and 2/4 -> AP 0.5
    assert result.loc["mj", "average_precision"] == pytest.approx(0.5)
    assert per_generator_metrics(table)["generator"].iloc[0] == "mj", "worst accuracy first"


def test_per_generator_uses_correct_column_and_checks_input() -> None:
    table = pd.DataFrame({"generator": ["a", "a"], "label": ["ai", "ai"], "p_ai": [0.9, 0.8], "correct": [False, True]})
    result = per_generator_metrics(table)
    assert result.loc[0, "accuracy"] == 0.5 and math.isnan(result.loc[0, "roc_auc"]), "no real images: NaN"
    with pytest.raises(ValueError, match="missing columns: generator"):
        per_generator_metrics(table.drop(columns="generator"))
    with pytest.raises(ValueError, match="label must be real or ai"):
        per_generator_metrics(table.assign(label="fake"))
