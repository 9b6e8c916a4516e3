"""Tests for pipeline_lib.learn.probe (and the probe paths of train.train_model and models): probe and finetune
training on tiny foundation backbones, the feature cache's hits and misses, probe checkpoints and pickles."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipeline_lib.core import catalog as cat
from pipeline_lib.core.config import ProbeConfig, TrainConfig
from pipeline_lib.core.workspace import Workspace, put_in_store
from pipeline_lib.learn import heads, models, preprocess, probe
from pipeline_lib.learn.history import EpochStats
from pipeline_lib.learn.train import train_model
from tests.tiny_backbones import CLIP_SIZE, DINO_SIZE, safetensors_file, use_tiny_backbones


@pytest.fixture(autouse=True)
def _tiny(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    use_tiny_backbones(monkeypatch)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))


def _image(rng: np.random.Generator, label: str) -> bytes:
    """A real image is dark colour blobs, an ai one bright blobs (a split any backbone's features separate)."""
    low, high = (0, 90) if label == "real" else (165, 255)
    base = rng.integers(low, high + 1, size=(3, 3, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(base).resize((40, 40), Image.Resampling.BICUBIC).save(buffer, "PNG")
    return buffer.getvalue()


def _catalog(workspace: Workspace, per_label: dict[str, int], seed: int = 0) -> pd.DataFrame:
    """Rows of stored images: per_label[split] images of each label in that split."""
    rng = np.random.default_rng(seed)
    records = []
    for split, count in per_label.items():
        for label in ("real", "ai"):
            for i in range(count):
                sha, path = put_in_store(workspace, _image(rng, label), "png")
                group = f"{label}-{split}-{seed}-{i % 2}"
                row = {"sha256": sha, "path": workspace.relative(path), "label": label, "group": group}
                records.append(row | {"status": "ok", "split": split})
    return cat.new_rows(records)


def _config(model: str = "clip_vit_b16", **changes: object) -> TrainConfig:
    size = CLIP_SIZE if model.startswith("clip") else DINO_SIZE
    values: dict[str, object] = {"model": model, "weights": "none", "image_size": size, "batch_size": 8}
    values |= {"device": "cpu", "num_workers": 0, "probe": ProbeConfig(epochs=40, patience=5)}
    return TrainConfig(**(values | changes))


def test_probe_trains_a_head_on_cached_features_and_writes_a_usable_checkpoint(
    workspace: Workspace, tmp_path: Path
) -> None:
    table = _catalog(workspace, {"train": 10, "val": 4, "test": 2})
    seen: list[EpochStats] = []
    result = train_model(workspace, table, _config(), tmp_path / "run", on_epoch=seen.append)
    assert result.mode == "probe" and result.features == {"computed": 28.0, "reused": 0.0}
    assert [e.epoch for e in seen] == [e.epoch for e in result.history] and {e.phase for e in seen} == {"probe"}
    assert result.history[result.best_epoch - 1].val_accuracy == 1.0, "bright vs dark must be separable"
    model, meta = models.load_model(result.best_path)
    assert meta["mode"] == "probe" and meta["head"] == heads.probe_spec("linear", 256, 0.0)
    assert models.is_probe(model) and "backbone" not in meta, "random weights: the backbone is in the checkpoint"
    test = table[table["split"] == "test"]
    images = preprocess.load_tensors(workspace, test["sha256"].tolist(), CLIP_SIZE)
    with torch.inference_mode():
        direct = model(images.float() / 255.0).numpy()
    cached = probe.cached_logits(workspace, model, test["sha256"].tolist(), CLIP_SIZE)
    np.testing.assert_allclose(cached, direct, rtol=1e-4, atol=1e-5, err_msg="cached features give the same logits")
    assert (cached.argmax(axis=1) == (test["label"] == "ai").to_numpy()).all()


def test_a_recrawl_embeds_only_new_images_and_new_head_settings_embed_nothing(
    workspace: Workspace, tmp_path: Path
) -> None:
    first = _catalog(workspace, {"train": 10, "val": 5})
    assert train_model(workspace, first, _config(), tmp_path / "a").features == {"computed": 30.0, "reused": 0.0}
    grown = pd.concat([first, _catalog(workspace, {"train": 1, "val": 1}, seed=1)], ignore_index=True)  # +4: 10%
    again = train_model(workspace, grown, _config(), tmp_path / "b")
    assert again.features == {"computed": 4.0, "reused": 30.0}, "only the images the re-crawl added are embedded"
    mlp = _config(probe=ProbeConfig(head="mlp", hidden=16, dropout=0.1, epochs=5, lr=0.01))
    changed = train_model(workspace, grown, mlp, tmp_path / "c")
    assert changed.features == {"computed": 0.0, "reused": 34.0}, "a change of head settings embeds nothing"
    assert models.load_model(changed.best_path)[0].head_spec == {"kind": "probe", "hidden": 16, "dropout": 0.1}
    other_size = train_model(workspace, grown, _config("dinov2_vits14"), tmp_path / "d")
    assert other_size.features["computed"] == 34.0, "another backbone is another cache"


def test_finetune_mode_trains_all_layers_of_a_foundation_backbone(workspace: Workspace, tmp_path: Path) -> None:
    table = _catalog(workspace, {"train": 4, "val": 2})
    config = _config("dinov2_vitb14", mode="finetune", epochs=2, head_only_epochs=1, lr=0.01)
    result = train_model(workspace, table, config, tmp_path / "run")
    assert result.mode == "finetune" and [e.phase for e in result.history] == ["head", "all"]
    model, meta = models.load_model(result.best_path)
    assert not models.is_probe(model) and meta["head"] == {"kind": "linear"}
    assert model(torch.rand(1, 3, DINO_SIZE, DINO_SIZE)).shape == (1, 2)


def test_a_probe_on_published_weights_keeps_only_its_head_and_the_file_it_names(
    workspace: Workspace, tmp_path: Path
) -> None:
    source = models.Classifier("dinov2_vits14").backbone
    data, digest = safetensors_file(source.state_dict())
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    stored = checkpoints / "vit_small_patch14_dinov2.lvd142m.safetensors"
    stored.write_bytes(data)
    table = _catalog(workspace, {"train": 6, "val": 2})
    result = train_model(workspace, table, _config("dinov2_vits14", weights="pretrained"), tmp_path / "run")
    payload = torch.load(result.best_path, weights_only=True)
    assert all(key.startswith("head.") for key in payload["state_dict"]), "the backbone is not copied per run"
    assert payload["meta"]["backbone"] == {"file": stored.name, "sha256": digest}
    model, _ = models.load_model(result.best_path)
    assert torch.equal(model.backbone.pos_embed, source.pos_embed), "the backbone is rebuilt from the cached file"
    buffer = io.BytesIO()
    torch.save(model, buffer)  # what MLflow's pickle format does
    assert buffer.tell() < 200_000, f"a pickled probe is the head and a reference, got {buffer.tell()} bytes"
    buffer.seek(0)
    unpickled = torch.load(buffer, weights_only=False)
    x = torch.rand(2, 3, DINO_SIZE, DINO_SIZE)
    torch.testing.assert_close(unpickled(x), model(x))
    stored.write_bytes(data[:-8] + b"\0" * 8)
    with pytest.raises(models.WeightsError, match="not the weights file this model was trained on"):
        models.load_model(result.best_path)
    stored.unlink()
    with pytest.raises(models.WeightsNotFoundError, match="aidetect weights fetch dinov2_vits14"):
        models.load_model(result.best_path)


def test_fit_head_stops_early_keeps_the_best_epoch_and_is_reproducible() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(80, 6, generator=generator)
    y = (x[:, 0] + 0.3 * torch.randn(80, generator=generator) > 0).long()
    train, val = (x[:60], y[:60]), (x[60:], y[60:])
    config = ProbeConfig(epochs=200, patience=3, lr=0.05, batch_size=16)
    heads_made = []
    for _ in range(2):
        torch.manual_seed(3)  # the same initial head
        heads_made.append(heads.ProbeHead(6, 2))
    fits = [probe.fit_head(head, train, val, config, seed=7) for head in heads_made]
    assert fits[0].stopped_early and len(fits[0].history) == fits[0].best_epoch + config.patience
    assert fits[0].best_val_loss == min(e.val_loss for e in fits[0].history), "the best epoch's head is kept"
    for key, value in fits[0].state.items():
        assert torch.equal(value, fits[1].state[key]), f"{key}: same seed, same head"
    torch.testing.assert_close(heads_made[0].shift, x[:60].mean(dim=0), msg="standardised with train's mean")


def test_undersampling_draws_each_class_as_often_as_the_smallest() -> None:
    labels = torch.tensor([0] * 9 + [1] * 3)
    picked = probe._undersampled(labels, torch.Generator().manual_seed(1))
    assert sorted(labels[picked].tolist()) == [0, 0, 0, 1, 1, 1]
