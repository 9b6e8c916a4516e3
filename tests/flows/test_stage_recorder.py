"""How many MLflow runs a flow run makes: one nested run per stage that computed something, none for a crawl that
found nothing new (its counts go on the flow's run). The real crawl flow on a local folder, Prefect's harness,
MLflow on SQLite in the workspace."""

from __future__ import annotations

from pathlib import Path

from flows.pipeline import crawl_flow
from pipeline_lib.core.config_loader import build_config
from pipeline_lib.core.tracking.runs import Tracker, run_summary
from pipeline_lib.core.tracking.stage_runs import OUTPUT_TAG, stage_runs
from tests.conftest import make_image


def _crawl(folder: Path, root: Path) -> tuple[dict, dict, dict]:
    """Run the crawl flow; (its result, its MLflow run's summary, its nested runs by stage)."""
    data = {"sources": {"folders": [{"path": str(folder), "label": "real"}]}}
    config = build_config(data, [f"execution.workspace={root}", "tracking.system_metrics_interval_s=0"])
    result = crawl_flow(config)
    tracker = Tracker(f"sqlite:///{root / 'mlflow.db'}", result["mlflow_run_id"])
    return result, run_summary(tracker.uri, tracker.run_id), stage_runs(tracker)


def test_a_crawl_that_finds_nothing_new_adds_no_nested_run(harness, tmp_path: Path):
    folder, root = tmp_path / "photos", tmp_path / "ws"
    for index in range(3):
        make_image(folder / f"anna/{index}.jpg", seed=index, size=(64, 64))

    first, _, children = _crawl(folder, root)
    assert set(children) == {"crawl", "ingest"}, children
    crawled = run_summary(f"sqlite:///{root / 'mlflow.db'}", children["crawl"]["run_id"])
    assert crawled["tags"][OUTPUT_TAG], "the crawl's nested run must name its output"

    again, parent, children = _crawl(folder, root)
    assert again["states"] == {"crawl": "Completed", "ingest": "Cached"}, again["states"]
    assert children == {}, f"nothing new: the flow's run must be the only MLflow run, got nested {sorted(children)}"
    assert parent["tags"]["aidetect.stage.crawl.unchanged"] == "true", parent["tags"]
    assert parent["metrics"]["crawl.new"] == 0 and "crawl.seconds" in parent["metrics"], parent["metrics"]

    make_image(folder / "bert/0.jpg", seed=9, size=(64, 64))
    _, parent, children = _crawl(folder, root)
    assert set(children) == {"crawl", "ingest"}, f"a new file is a change: {sorted(children)}"
    assert "aidetect.stage.crawl.unchanged" not in parent["tags"]
