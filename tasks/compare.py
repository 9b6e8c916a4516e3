"""The task of `aidetect compare` that records its table: the pages in the workspace's reports/, an MLflow run."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from pipeline_lib.assess import backbone_compare as compare
from pipeline_lib.core.tracking.runs import start_run
from pipeline_lib.core.workspace import Workspace, atomic_write_text


@task(name="compare-record", cache_policy=NO_CACHE)
def record_comparison(
    root: str, uri: str, experiment: str, contenders: list[compare.Contender], comparison_id: str
) -> dict[str, str]:
    """Write reports/compare-<id>.html and .md, and log an MLflow run of kind compare with the table (long form,
    Markdown, the page), each contender's numbers as metrics and its pipeline run's id as a tag; their paths and
    the run's id."""
    workspace = Workspace.create(root)
    table = compare.side_by_side(contenders)
    title = f"aidetect compare {comparison_id}: {' vs '.join(c.label for c in contenders)}"
    notes = [f"Same workspace and split ({workspace.root}); each column is one config's pipeline run."]
    page, markdown = compare.report_paths(workspace.reports, comparison_id)
    atomic_write_text(page, compare.to_html(table, title, notes))
    atomic_write_text(markdown, compare.to_markdown(table))
    tags = {"aidetect.kind": "compare", "aidetect.workspace": str(workspace.root)}
    tags |= {f"aidetect.compare.{compare.metric_name(c.label)}": c.run_id for c in contenders}
    tracker = start_run(uri, experiment, workspace, f"compare-{comparison_id}", tags)
    try:
        tracker.log_metrics(compare.comparison_metrics(contenders))
        tracker.log_table(compare.long_form(table), "comparison/table.json")
        tracker.log_text(compare.to_markdown(table), "comparison/table.md")
        tracker.log_artifact(page, "comparison")
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish("FINISHED")
    return {"html": str(page), "markdown": str(markdown), "mlflow_run_id": tracker.run_id}
