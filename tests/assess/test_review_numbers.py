"""Tests for pipeline_lib.assess.review_numbers: the review gate's numbers in the report."""

from __future__ import annotations

from pathlib import Path

from pipeline_lib.assess.evaluate import per_group_accuracy
from pipeline_lib.assess.report import build_report
from pipeline_lib.assess.report_content import select_examples
from pipeline_lib.assess.review_numbers import REVIEW_METRICS, review_rows
from tests.assess.conftest import random_images
from tests.assess.test_report import make_predictions
from tests.conftest import TinyClassifier

NUMBERS = {
    "review.pending": 120.0,
    "review.suspects_shown": 14.0,
    "review.rejected": 9.0,
    "review.approved_by_model": 106.0,
    "review.model_suspects_overturned": 3.0,
    "review.approved": 500.0,  # not one of the review's numbers the report shows
}


def test_rows_follow_the_metrics_present_in_a_fixed_order() -> None:
    rows = review_rows(NUMBERS)
    assert [row["name"] for row in rows] == list(REVIEW_METRICS)
    assert rows[1] == {"name": "review.suspects_shown", "what": REVIEW_METRICS["review.suspects_shown"], "value": "14"}
    assert review_rows({}) == [], "a run without a review gate has no review rows"


def test_the_report_has_a_review_section(tmp_path: Path, model: TinyClassifier) -> None:
    predictions = make_predictions()
    selected = select_examples(predictions, per_cell=1).head(1)
    common = {
        "images": random_images(1, 32),
        "selected": selected,
        "metrics": {"accuracy": 0.9},
        "per_group": per_group_accuracy(predictions),
        "target_layer": model.net.layer4[-1],
        "cam_method": "gradcam",
        "title": "t",
    }
    text = " ".join(build_report(tmp_path / "a", model, review=NUMBERS, **common).read_text(encoding="utf-8").split())
    assert '<h3 id="review">Review</h3>' in text and '<a href="#review">Review</a>' in text
    assert (
        '<tr><th>suspects a person approved (the model&#39;s suspicion overturned)</th><td class="num">3</td>' in text
    )
    assert '<th>images approved by the model (review.mode assisted)</th><td class="num">106</td>' in text
    plain = build_report(tmp_path / "b", model, **common).read_text(encoding="utf-8")
    assert "No review numbers (the run had no review gate)." in plain
