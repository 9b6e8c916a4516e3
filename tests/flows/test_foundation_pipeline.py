"""The whole pipeline with a foundation backbone in probe mode (a tiny CLIP of open_clip's own class): the probe
trains on cached features, evaluation (calibration, robustness, per generator, CAM attention), the report's ViT
Grad-CAM, the registry's champion rebuilt for `predict`; a second run with other head settings embeds nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from flows.pipeline import pipeline
from pipeline_lib.assess.predict import predict_files
from pipeline_lib.assess.registry import load_champion
from pipeline_lib.core.tracking.runs import run_summary
from pipeline_lib.learn import models
from pipeline_lib.ops import demo_data
from tests.flows.test_pipeline import _config
from tests.network_guard import no_remote_connections
from tests.tiny_backbones import CLIP_SIZE, use_tiny_backbones

pytestmark = pytest.mark.slow
PROBE = [
    "train.model=clip_vit_b16",
    "train.weights=none",
    f"train.image_size={CLIP_SIZE}",
    "train.probe.epochs=30",
    "train.probe.patience=5",
    "evaluate.bootstrap=20",
    "report.images_per_cell=1",
    "tracking.system_metrics_interval_s=0",
]


def test_a_probe_runs_through_every_stage_and_retrains_on_cached_features(
    harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_tiny_backbones(monkeypatch)
    dataset = demo_data.generate_demo_dataset(tmp_path / "data", n_persons_per_class=10, image_size=64, seed=3)
    root = tmp_path / "ws"
    with no_remote_connections() as attempts, demo_data.search_site(dataset) as endpoint:
        first = pipeline(_config(dataset, endpoint, root, PROBE))
        mlp = pipeline(_config(dataset, endpoint, root, [*PROBE, "train.probe.head=mlp", "train.probe.hidden=8"]))
    assert not attempts, attempts
    assert [first["states"][s] for s in ("train", "evaluate", "report")] == ["Completed"] * 3, first["states"]
    summary = run_summary(first["tracking_uri"], first["mlflow_run_id"])
    metrics, tags = summary["metrics"], summary["tags"]
    trained = int(sum(metrics[f"split.{s}.{label}.images"] for s in ("train", "val") for label in ("real", "ai")))
    assert tags["aidetect.train_mode"] == "probe"
    assert (metrics["train.features_computed"], metrics["train.features_reused"]) == (trained, 0)
    for key in ("test.accuracy", "test.calibration.temperature", "test.cam.n", "test.ece"):
        assert key in metrics, key
    assert any(key.startswith("test.robust.") for key in metrics), "robustness passes ran on the degraded files"
    assert any(key.startswith("test.generator.") for key in metrics), sorted(metrics)
    html = Path(first["report"]).read_text(encoding="utf-8")
    assert "Grad-CAM layer" in html and "transformer.resblocks[-1].ln_1" in html, "the report names the layer"

    assert mlp["states"]["train"] == "Completed" and mlp["states"]["preprocess"] == "Cached"
    again = run_summary(mlp["tracking_uri"], mlp["mlflow_run_id"])["metrics"]
    assert (again["train.features_computed"], again["train.features_reused"]) == (0, trained), "head change only"

    champion, size = load_champion(first["tracking_uri"], first["registered_model"])
    assert size == CLIP_SIZE and models.is_probe(champion) and champion.name == "clip_vit_b16"
    picture = next(dataset.ai_dir.rglob("*.png"))
    (row,) = predict_files(champion, {"image_size": size}, [picture], cam_dir=tmp_path / "cams")
    assert row.error is None and 0 <= row.p_ai <= 1
    with Image.open(row.cam) as overlay:
        assert overlay.size == (CLIP_SIZE, CLIP_SIZE)
