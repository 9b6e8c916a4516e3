"""The generalization stage and `aidetect compare` on synthetic data whose AI images name two generators, with tiny
foundation backbones in probe mode: one leave-one-generator-out row per generator in MLflow and the report, cached on
a rerun; two configs compared side by side in reports/ and an MLflow run of their own; usage errors in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app
from flows.pipeline import pipeline
from pipeline_lib.core.config_loader import build_config, merge_mappings, read_yaml_mapping
from pipeline_lib.core.tracking.runs import run_summary
from pipeline_lib.ops import demo_data
from tests.flows.test_pipeline import DEMO_YAML
from tests.network_guard import no_remote_connections
from tests.tiny_backbones import CLIP_SIZE, DINO_SIZE, use_tiny_backbones

pytestmark = pytest.mark.slow
runner = CliRunner()
GENERATORS = ("gen-a", "gen-b")
SMALL = {
    "train": {"weights": "none", "probe": {"epochs": 15, "patience": 4}},
    "evaluate": {"bootstrap": 20},
    "report": {"images_per_cell": 1},
    "tracking": {"system_metrics_interval_s": 0},
}
CLIP = {"train": {"model": "clip_vit_b16", "image_size": CLIP_SIZE}}
DINO = {"train": {"model": "dinov2_vits14", "image_size": DINO_SIZE}}


def _two_generators(dataset: demo_data.DemoDataset, root: Path) -> list[dict[str, Any]]:
    """The demo's AI prompts shared out between two folders, each a folder source naming its generator."""
    prompts = sorted(folder for folder in dataset.ai_dir.iterdir() if folder.is_dir())
    sources = []
    for index, generator in enumerate(GENERATORS):
        for prompt in prompts[index :: len(GENERATORS)]:
            shutil.copytree(prompt, root / generator / prompt.name)
        sources.append({"path": str(root / generator), "label": "ai", "group_by": "folder", "generator": generator})
    return sources


def _config_data(dataset: demo_data.DemoDataset, endpoint: str, tmp_path: Path, backbone: dict) -> dict[str, Any]:
    data = merge_mappings(read_yaml_mapping(DEMO_YAML), demo_data.demo_config_dict(dataset, endpoint, tmp_path / "ws"))
    sources = data["sources"] | {"folders": _two_generators(dataset, tmp_path / "ai")}
    data = merge_mappings(data, {"sources": sources, "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}})
    return merge_mappings(merge_mappings(data, SMALL), backbone)


def test_leave_one_generator_out_table_then_compare_two_backbones(
    harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_tiny_backbones(monkeypatch)
    dataset = demo_data.generate_demo_dataset(tmp_path / "data", n_persons_per_class=10, image_size=64, seed=3)
    with no_remote_connections() as attempts, demo_data.search_site(dataset) as endpoint:
        clip = _config_data(dataset, endpoint, tmp_path, CLIP)
        dino = merge_mappings(clip, DINO)
        first = pipeline(build_config(clip, origin="test"))
        files = {name: tmp_path / f"{name}.yaml" for name in ("clip", "dino")}
        for name, data in (("clip", clip), ("dino", dino)):
            files[name].write_text(yaml.safe_dump(data), encoding="utf-8")
        result = runner.invoke(app, ["compare", str(files["clip"]), str(files["dino"]), "--json"])
    assert not attempts, attempts
    assert first["states"]["generalization"] == "Completed", first["states"]
    rows = first["generalization"]
    assert [row["generator"] for row in rows] == list(GENERATORS), rows
    assert all(row["n_ai"] > 0 and row["n_real"] > 0 and not row["note"] for row in rows), rows
    assert all(row["how"].startswith("probe: linear head on frozen clip_vit_b16") for row in rows), rows
    summary = run_summary(first["tracking_uri"], first["mlflow_run_id"])
    for generator in GENERATORS:
        for name in ("accuracy", "accuracy_ci_low", "roc_auc", "train_seconds"):
            assert f"loo.{generator}.{name}" in summary["metrics"], (generator, name, sorted(summary["metrics"]))
    assert "stages/generalization.json" in summary["artifacts"], summary["artifacts"]
    html = Path(first["report"]).read_text(encoding="utf-8")
    section = html.split('id="generalization"')[1].split('id="groups"')[0]
    assert section.count("<tr>") == 1 + len(GENERATORS) and all(g in section for g in GENERATORS), section

    assert result.exit_code == 0, result.output
    compared = _json_tail(result.output)
    assert compared["states"]["clip"]["generalization"] == "Cached", "the first config's rerun reuses its table"
    assert compared["states"]["dino"]["split"] == "Cached" and compared["states"]["dino"]["train"] == "Completed"
    table = {row["measure"]: row for row in compared["table"]}
    assert set(table["model"]) == {"measure", "clip", "dino"}, "one column per config"
    assert table["model"]["clip"] == "clip_vit_b16 (probe)" and table["model"]["dino"] == "dinov2_vits14 (probe)"
    for generator in GENERATORS:
        cells = table[f"held out {generator}: accuracy [95% Wilson CI], ROC-AUC"]
        assert "AUC" in cells["clip"] and "AUC" in cells["dino"], cells
    page = Path(compared["html"])
    assert page.parent == tmp_path / "ws" / "reports" and page.name.startswith("compare-"), page
    assert "clip_vit_b16 (probe)" in page.read_text(encoding="utf-8") and Path(compared["markdown"]).is_file()
    run = run_summary(first["tracking_uri"], compared["mlflow_run_id"])
    assert run["tags"]["aidetect.kind"] == "compare" and run["tags"]["aidetect.compare.clip"], run["tags"]
    assert {"clip.accuracy", "dino.roc_auc", "dino.loo.gen-a.accuracy", "clip.train_seconds"} <= set(run["metrics"])
    assert {"comparison/table.json", "comparison/table.md"} <= set(run["artifacts"]), run["artifacts"]


def _json_tail(output: str) -> dict[str, Any]:
    """The JSON object the command printed (progress lines may come before it)."""
    start = output.find('{\n "html"')
    assert start >= 0, output
    return json.loads(output[start:])


def test_compare_usage_errors_are_one_line_with_exit_2(tmp_path: Path) -> None:
    one = tmp_path / "a.yaml"
    one.write_text(yaml.safe_dump({"split": {"seed": 1}}), encoding="utf-8")
    other = tmp_path / "b.yaml"
    other.write_text(yaml.safe_dump({"split": {"seed": 2}, "train": {"model": "resnet18"}}), encoding="utf-8")
    for args, expected in (
        ([str(one)], "two or more config files"),
        ([str(one), str(other)], "differ in: split"),
        ([str(one), str(tmp_path / "missing.yaml")], "missing.yaml"),
    ):
        result = runner.invoke(app, ["compare", *args, "--workspace", str(tmp_path / "ws")])
        assert result.exit_code == 2 and expected in result.output, (args, result.output)
        assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output, result.output
    assert not (tmp_path / "ws").exists(), "nothing written"
