"""Tests for pipeline_lib.assess.report_content: which examples the report shows, and its warnings."""

from __future__ import annotations

from pathlib import Path

from pipeline_lib.assess.report_content import report_warnings, select_examples
from tests.assess.test_report import make_predictions
from tests.conftest import TinyClassifier


def test_select_examples_cells_limits_and_order() -> None:
    predictions = make_predictions()
    selected = select_examples(predictions, per_cell=1)
    by_cell = dict(zip(selected["cell"], selected["p_ai"], strict=True))
    # Most confident per cell: ai right 0.95, ai wrong 0.1, real right 0.05, real wrong 0.85.
    expected = {"ai_correct": 0.95, "ai_misclassified": 0.1, "real_correct": 0.05, "real_misclassified": 0.85}
    assert by_cell == expected, f"wrong example picked per cell: {by_cell}"
    both = select_examples(predictions, per_cell=5)
    assert len(both) == 8 and both["cell"].value_counts().to_dict() == dict.fromkeys(expected, 2), (
        "per_cell larger than a cell should return the whole cell"
    )
    assert "cell" not in predictions.columns, "select_examples mutated its input"


def test_report_without_flags_says_so(tmp_path: Path, model: TinyClassifier) -> None:
    metrics = {"accuracy": 0.9, "accuracy_ci_low": 0.88, "accuracy_ci_high": 0.92, "n_test": 900.0}
    assert report_warnings(["format-shortcut audit [ok] on the train split: ROC-AUC 0.55"], metrics) == []


def test_cell_counts_are_what_each_cell_holds() -> None:
    from pipeline_lib.assess.report_content import cell_counts

    predictions = make_predictions()
    counts = cell_counts(predictions)
    assert counts == {"ai_misclassified": 2, "real_misclassified": 2, "ai_correct": 2, "real_correct": 2}, counts
    assert sum(counts.values()) == len(predictions)
