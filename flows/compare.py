"""The compare flow: the pipeline once per config on one workspace and split, then one side-by-side table."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from prefect import flow

from flows.pipeline import pipeline
from pipeline_lib.assess import backbone_compare as compare
from pipeline_lib.core.config import PipelineConfig
from tasks.compare import record_comparison


@flow(name="aidetect-compare")
def compare_flow(configs: list[PipelineConfig], labels: list[str]) -> dict[str, Any]:
    """Run each config's pipeline (a subflow; the stages before training are shared and cached), then record the
    table of their test accuracy with CI, ROC-AUC, held-out generators and training time."""
    summaries = [pipeline(config) for config in configs]
    contenders = [compare.contender(label, c, s) for label, c, s in zip(labels, configs, summaries, strict=True)]
    comparison_id = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    first = summaries[0]
    recorded = record_comparison(
        first["workspace"], first["tracking_uri"], configs[0].tracking.experiment, contenders, comparison_id
    )
    table = compare.side_by_side(contenders)
    states = {label: summary["states"] for label, summary in zip(labels, summaries, strict=True)}
    markdown = compare.to_markdown(table)
    return recorded | {"table": table.to_dict("records"), "markdown_table": markdown, "states": states}
