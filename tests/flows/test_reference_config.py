"""configs/reference.yaml end to end: its keyword file and Midjourney folder swapped for tiny loopback fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.pipeline import pipeline
from pipeline_lib.core.config_loader import build_config, merge_mappings, read_yaml_mapping
from pipeline_lib.core.tracking.runs import run_summary
from pipeline_lib.ops import demo_data
from tests.loopback import LoopbackSite, google_result_page

pytestmark = pytest.mark.slow
REFERENCE = Path(__file__).resolve().parents[2] / "configs" / "reference.yaml"
TINY = [  # the method's model and settings, on tiny inputs and without downloaded weights
    "train.weights=none",
    "train.image_size=32",
    "train.epochs=2",
    "train.head_only_epochs=1",
    "train.num_workers=0",
    "ingest.min_side=32",
    "review.mode=auto",
    "split.min_groups_per_label=1",  # 8 persons per class cannot give 5 groups to each of val and test
    "evaluate.bootstrap=50",
    "report.images_per_cell=2",
    "tracking.system_metrics_interval_s=0",
]


def test_reference_config_runs_end_to_end_on_loopback_fixtures(harness, tmp_path: Path) -> None:
    dataset = demo_data.generate_demo_dataset(tmp_path / "data", n_persons_per_class=8, image_size=64, seed=5)
    keywords = tmp_path / "names.txt"
    keywords.write_text("# the user's names\n" + "\n".join(dataset.keywords) + "\n", encoding="utf-8")
    images = {
        f"{keyword}/{path.name}": path.read_bytes()
        for keyword in dataset.keywords
        for path in sorted((dataset.site_dir / keyword).iterdir())
    }
    site = LoopbackSite(images, page=google_result_page)  # a Google-shaped result page per name
    site.listing = {
        keyword: [name for name in images if name.startswith(f"{keyword}/")] for keyword in dataset.keywords
    }
    data = read_yaml_mapping(REFERENCE)
    with site.serve() as endpoint:
        search = data["sources"]["search"][0] | {
            "keywords_file": str(keywords),
            "endpoint": endpoint.replace("first=", "start="),
        }
        folder = data["sources"]["folders"][0] | {"path": str(dataset.ai_dir)}
        fixtures = {
            "sources": {"search": [search], "folders": [folder], "allow_private_addresses": True},
            "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
            "execution": {"workspace": str(tmp_path / "ws")},
        }
        config = build_config(merge_mappings(data, fixtures), TINY, origin="reference.yaml with test fixtures")
        result = pipeline(config)

    assert set(result["states"].values()) == {"Completed"}, result["states"]
    assert sorted(site.queries) == sorted(dataset.keywords), "every name of the keyword file was searched"
    filters = "&tbs=itp:photo,ic:color,isz:lt,islt:4mp"  # photo, colour, larger than 4 MP
    assert all(path.endswith(filters) for path in site.search_paths), site.search_paths
    summary = run_summary(result["tracking_uri"], result["mlflow_run_id"])
    params, metrics = summary["params"], summary["metrics"]
    assert (params["train.model"], params["train.batch_size"], params["train.class_balance"]) == (
        "resnet50",
        "64",
        "undersample",
    )
    assert params["split.test"] == "0.2222222" and params["sources.folders"].count("midjourney") == 1
    assert 0.0 <= metrics["test.accuracy"] <= 1.0 and "test.robust.jpeg75.accuracy" in metrics
    assert metrics["train.class_balance.ai.weight"] == 1.0 and "train.class_balance.images_per_epoch" in metrics
    assert any(note.startswith("class ratio real:ai per split: train") for note in result["notes"]), result["notes"]
    html = Path(result["report"]).read_text(encoding="utf-8")
    assert "each image&#39;s predicted class" in html and "The original test files degraded" in html
