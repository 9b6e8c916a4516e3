"""Tests for pipeline_lib.assess.backbone_compare: the side-by-side table of `aidetect compare`, its pages and
metrics, and the check that the configs see the same data and split."""

from __future__ import annotations

import math

from pipeline_lib.assess import backbone_compare as compare
from pipeline_lib.core.config import PipelineConfig

METRICS = {"accuracy": 0.9, "accuracy_ci_low": 0.8, "accuracy_ci_high": 0.95, "roc_auc": 0.97, "n_test": 40.0}
ROW = {"generator": "gen-a", "accuracy": 0.7, "accuracy_ci_low": 0.5, "accuracy_ci_high": 0.85, "roc_auc": 0.75,
       "train_seconds": 1.25, "note": ""}  # fmt: skip


def _contenders() -> list[compare.Contender]:
    cnn = compare.Contender("default", "resnet50", "finetune", METRICS, 812.0, [ROW], "run-a")
    failed = ROW | {"note": "leaves no AI image in train", "accuracy": math.nan}
    clip = compare.Contender("foundation", "clip_vit_l14", "probe", METRICS | {"accuracy": 0.95}, 12.5,
                             [failed, ROW | {"generator": "gen-<b>"}], "run-b")  # fmt: skip
    return [cnn, clip]


def test_one_column_per_contender_and_a_row_per_measure_and_held_out_generator() -> None:
    table = compare.side_by_side(_contenders())
    assert list(table.columns) == ["measure", "default", "foundation"]
    rows = {row["measure"]: row for row in table.to_dict("records")}
    assert rows["model"] == {"measure": "model", "default": "resnet50 (finetune)", "foundation": "clip_vit_l14 (probe)"}
    assert (rows["test accuracy"]["foundation"], rows["95% CI (bootstrap)"]["default"]) == ("0.950", "0.800-0.950")
    assert rows["train seconds"]["default"] == "812.0" and rows["test images"]["foundation"] == "40"
    held_out_a = rows["held out gen-a: accuracy [95% Wilson CI], ROC-AUC"]
    assert held_out_a["default"] == "0.700 [0.500-0.850], AUC 0.750"
    assert held_out_a["foundation"] == "not trained: leaves no AI image in train"
    assert rows["held out gen-<b>: accuracy [95% Wilson CI], ROC-AUC"]["default"] == "n/a", "the first has no gen-<b>"
    assert rows["MLflow run"]["foundation"] == "run-b"


def test_without_generators_the_table_says_so() -> None:
    lone = compare.Contender("a", "resnet18", "finetune", METRICS, 1.0)
    twin = compare.Contender("b", "resnet50", "finetune", METRICS, 2.0)
    rows = {row["measure"]: row for row in compare.side_by_side([lone, twin]).to_dict("records")}
    assert rows["held-out generators"]["a"].startswith("none (the data names fewer than two generators)")


def test_pages_escape_every_cell_and_metrics_skip_rows_not_trained() -> None:
    table = compare.side_by_side(_contenders())
    page = compare.to_html(table, "a <title>", ["note & more"])
    assert "gen-&lt;b&gt;" in page and "gen-<b>" not in page and "a &lt;title&gt;" in page and "note &amp; more" in page
    markdown = compare.to_markdown(table)
    lines = markdown.splitlines()
    assert lines[0] == "| measure | default | foundation |" and len(lines) == len(table) + 2
    metrics = compare.comparison_metrics(_contenders())
    assert metrics["default.loo.gen-a.accuracy"] == 0.7 and metrics["foundation.train_seconds"] == 12.5
    assert "foundation.loo.gen-a.accuracy" not in metrics and metrics["foundation.loo.gen-_b_.roc_auc"] == 0.75
    long = compare.long_form(table)
    assert list(long.columns) == ["contender", "measure", "value"] and len(long) == 2 * len(table)


def test_labels_are_file_stems_made_unique_and_data_sections_must_agree() -> None:
    assert compare.column_labels(["default", "foundation", "default"]) == ["default", "foundation", "default #2"]
    base = PipelineConfig()
    other_model = base.model_copy(update={"train": base.train.model_copy(update={"model": "resnet18"})})
    other_split = base.model_copy(update={"split": base.split.model_copy(update={"seed": 7})})
    assert compare.differing_sections([base, other_model]) == [], "another backbone is what compare compares"
    assert compare.differing_sections([base, other_model, other_split]) == ["split"]
