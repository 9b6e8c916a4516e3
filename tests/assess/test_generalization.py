"""Tests for pipeline_lib.assess.generalization: the leave-one-generator-out table on tiny stored images, trained as
a probe of a tiny CLIP on cached features, and the short fine-tuning budget."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipeline_lib.assess import generalization as loo
from pipeline_lib.core import catalog as cat
from pipeline_lib.core.config import ProbeConfig, TrainConfig
from pipeline_lib.core.workspace import Workspace, put_in_store
from tests.tiny_backbones import CLIP_SIZE, use_tiny_backbones

# (label, generator, colour range): real images are dark, each generator's images bright in its own way
KINDS = (("real", "", (0, 90)), ("ai", "gen-a", (165, 255)), ("ai", "gen-b", (120, 255)))


@pytest.fixture(autouse=True)
def _tiny(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    use_tiny_backbones(monkeypatch)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))


def _image(rng: np.random.Generator, low: int, high: int) -> bytes:
    base = rng.integers(low, high + 1, size=(3, 3, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(base).resize((40, 40), Image.Resampling.BICUBIC).save(buffer, "PNG")
    return buffer.getvalue()


def _catalog(workspace: Workspace, per_split: dict[str, int], kinds: tuple = KINDS) -> pd.DataFrame:
    """Stored images: per_split[split] images of each kind in that split, one group per image."""
    rng = np.random.default_rng(0)
    records = []
    for split, count in per_split.items():
        for label, generator, (low, high) in kinds:
            for i in range(count):
                sha, path = put_in_store(workspace, _image(rng, low, high), "png")
                group = f"{label}-{generator}-{split}-{i}"
                records.append({"sha256": sha, "path": workspace.relative(path), "label": label, "group": group,
                                "generator": generator, "status": "ok", "split": split})  # fmt: skip
    return cat.new_rows(records)


def _probe_config() -> TrainConfig:
    return TrainConfig(model="clip_vit_b16", weights="none", image_size=CLIP_SIZE, batch_size=8, device="cpu",
                       num_workers=0, probe=ProbeConfig(epochs=10, patience=3))  # fmt: skip


def test_one_row_per_generator_each_model_trained_without_it_and_scored_on_it(
    workspace: Workspace, tmp_path: Path
) -> None:
    table = _catalog(workspace, {"train": 6, "val": 2, "test": 2})
    result = loo.leave_one_out(workspace, table, _probe_config(), loo.LeaveOutSettings(), tmp_path / "loo")
    assert list(result["generator"]) == ["gen-a", "gen-b"], result
    # every image of the left-out generator moves to test (10 of them), beside the 2 real test images
    assert list(result["n_ai"]) == [10, 10] and list(result["n_real"]) == [2, 2], result
    assert (result["n_test"] == 12).all() and (result["note"] == "").all(), result
    assert result["how"].str.startswith("probe: linear head on frozen clip_vit_b16").all(), result["how"]
    for row in result.itertuples():
        assert 0 <= row.accuracy_ci_low <= row.accuracy <= row.accuracy_ci_high <= 1, row
        assert 0 <= row.roc_auc <= 1 and row.train_seconds > 0, row
        assert (tmp_path / "loo" / row.generator / "best.pt").is_file(), f"the model left without {row.generator}"
    metrics = loo.loo_metrics(result)
    assert metrics["loo.generators"] == 2 and metrics["loo.gen-a.n_test"] == 12, metrics
    assert {"loo.gen-b.accuracy", "loo.gen-b.roc_auc", "loo.gen-b.train_seconds"} <= set(metrics)


def test_scored_rows_are_the_generators_ai_images_and_every_real_one(workspace: Workspace) -> None:
    table = _catalog(workspace, {"train": 1, "test": 2})
    rows = loo.scored_rows(table, "gen-b")
    assert sorted(zip(rows["label"], rows["generator"], strict=True)) == [("ai", "gen-b")] * 2 + [("real", "")] * 2


def test_one_generator_gives_no_rows_and_a_note_naming_how_to_name_more(workspace: Workspace, tmp_path: Path) -> None:
    table = _catalog(workspace, {"train": 2, "val": 1, "test": 1}, kinds=KINDS[:2])
    result = loo.leave_one_out(workspace, table, _probe_config(), loo.LeaveOutSettings(), tmp_path / "loo")
    assert result.empty and list(result.columns) == list(loo.COLUMNS)
    assert not (tmp_path / "loo").exists(), "nothing trained"
    assert "name 1 generator(s)" in loo.no_table_note(1) and "`generator`" in loo.no_table_note(1)


def test_finetune_gets_the_short_budget_with_half_of_it_head_only() -> None:
    config = TrainConfig(model="resnet18", epochs=30, head_only_epochs=5)
    short, how = loo.leave_out_config(config, loo.LeaveOutSettings(finetune_epochs=4))
    assert (short.epochs, short.head_only_epochs, short.resolved_mode) == (4, 2, "finetune")
    assert "4 epoch(s) at most" in how and "train.epochs is 30" in how
    probe, how = loo.leave_out_config(config, loo.LeaveOutSettings(mode="probe"))
    assert probe.resolved_mode == "probe" and how.startswith("probe: linear head on frozen resnet18")
    assert config.epochs == 30 and config.mode == "auto", "the configured settings are left as they were"


def test_a_generator_that_cannot_be_left_out_gets_an_empty_row_with_the_reason(
    workspace: Workspace, tmp_path: Path
) -> None:
    table = _catalog(workspace, {"train": 2, "val": 1, "test": 1})
    shared = table.assign(group=np.where(table["label"] == "ai", "one-group", table["group"]))  # one unit: no AI left
    result = loo.leave_one_out(workspace, shared, _probe_config(), loo.LeaveOutSettings(), tmp_path / "loo")
    assert list(result["generator"]) == ["gen-a", "gen-b"] and result["note"].str.contains("no AI image").all()
    assert result["accuracy"].map(math.isnan).all() and loo.loo_metrics(result) == {"loo.generators": 2.0}


def test_finetune_left_out_models_train_within_the_budget(workspace: Workspace, tmp_path: Path) -> None:
    table = _catalog(workspace, {"train": 3, "val": 1, "test": 1})
    config = TrainConfig(model="resnet18", weights="none", image_size=32, batch_size=8, epochs=30, head_only_epochs=5,
                         device="cpu", num_workers=0)  # fmt: skip
    result = loo.leave_one_out(workspace, table, config, loo.LeaveOutSettings(finetune_epochs=2), tmp_path / "loo")
    assert list(result["generator"]) == ["gen-a", "gen-b"] and (result["note"] == "").all(), result
    assert result["how"].str.contains("2 epoch\\(s\\) at most").all(), result["how"]
    for generator in ("gen-a", "gen-b"):
        state = torch.load(tmp_path / "loo" / generator / "last.pt", map_location="cpu", weights_only=True)
        assert state["epoch"] == 2, f"{generator}: trained {state['epoch']} epochs, the budget is 2"
