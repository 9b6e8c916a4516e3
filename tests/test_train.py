"""Tests for pipeline_lib.train on a tiny separable dataset (resnet18, 32x32, CPU)."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
from PIL import Image

from pipeline_lib import catalog as cat
from pipeline_lib import models
from pipeline_lib import train as train_lib
from pipeline_lib.config import AugmentConfig, TrainConfig
from pipeline_lib.workspace import Workspace, put_in_store

SIZE = 32


def _blobs(rng: np.random.Generator, low: int, high: int) -> np.ndarray:
    """Smooth colour blobs with values in [low, high]."""
    base = rng.integers(low, high + 1, size=(3, 3, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(base).resize((40, 40), Image.Resampling.BICUBIC))


def _dark(rng: np.random.Generator) -> np.ndarray:
    """A 'real' image: dark blobs."""
    return _blobs(rng, 0, 90)


def _bright(rng: np.random.Generator) -> np.ndarray:
    """An 'ai' image: bright blobs."""
    return _blobs(rng, 165, 255)


def _dataset(workspace: Workspace, n_train: int = 8, n_val: int = 4, seed: int = 0) -> pd.DataFrame:
    """A catalog of n per label and split, 2 groups per label, stored as PNG."""
    rng = np.random.default_rng(seed)
    records = []
    for split, count in (("train", n_train), ("val", n_val), ("test", 2)):
        for label, make in (("real", _dark), ("ai", _bright)):
            for i in range(count):
                buffer = io.BytesIO()
                Image.fromarray(make(rng)).save(buffer, "PNG")
                sha, path = put_in_store(workspace, buffer.getvalue(), "png")
                group = f"{label}-{split}-{i % 2}"
                records.append(
                    {
                        "sha256": sha,
                        "path": workspace.relative(path),
                        "label": label,
                        "group": group,
                        "status": "ok",
                        "split": split,
                    }
                )
    return cat.new_rows(records)


def _config(**changes: object) -> TrainConfig:
    values: dict[str, object] = {
        "model": "resnet18",
        "weights": "none",
        "image_size": SIZE,
        "batch_size": 8,
        "epochs": 3,
        "head_only_epochs": 0,
        "lr": 0.01,
        "patience": 5,
        "num_workers": 0,
        "device": "cpu",
        "augment": AugmentConfig(rotation_degrees=5, affine_translate=0.05, autocontrast_p=0.0),  # keeps brightness
    }
    values.update(changes)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Workspace, pd.DataFrame]:
    workspace = Workspace.create(tmp_path_factory.mktemp("train") / "ws")
    return workspace, _dataset(workspace)


def _states_equal(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_learns_separable_data(data: tuple[Workspace, pd.DataFrame], tmp_path: Path) -> None:
    workspace, table = data
    seen: list[train_lib.EpochStats] = []
    # From random weights on 16 images the head on frozen random features learns; full fine-tuning starts slowly.
    config = _config(epochs=5, head_only_epochs=4, lr=0.01, backbone_lr=1e-4)
    result = train_lib.train_model(workspace, table, config, tmp_path / "run", on_epoch=seen.append)
    assert [e.epoch for e in result.history] == [1, 2, 3, 4, 5] and seen == result.history
    assert [e.phase for e in result.history] == ["head", "head", "head", "head", "all"]
    assert result.history[3].train_loss < result.history[0].train_loss
    assert result.history[3].val_loss < result.history[0].val_loss
    assert result.history[result.best_epoch - 1].val_loss == result.best_val_loss
    assert result.history[result.best_epoch - 1].val_accuracy >= 0.75
    assert result.device == "cpu" and result.resumed_from_epoch is None and not result.stopped_early
    assert result.weights == models.WeightsInfo("none", "")
    assert set(vars(result.history[0])) >= {"epoch", "phase", "train_loss", "val_loss", "val_accuracy", "lr"}
    model, meta = models.load_model(result.best_path)
    assert meta["image_size"] == SIZE and meta["model_name"] == "resnet18" and meta["epoch"] == result.best_epoch
    assert result.last_path.is_file()


def test_head_only_phase_freezes_backbone(data: tuple[Workspace, pd.DataFrame], tmp_path: Path) -> None:
    workspace, table = data
    source = torchvision.models.resnet18()
    weights = tmp_path / "init.pt"
    torch.save(source.state_dict(), weights)
    config = _config(epochs=2, head_only_epochs=2, weights=str(weights), lr=0.05)
    initial, _ = train_lib.build_initial_model(config)
    result = train_lib.train_model(workspace, table, config, tmp_path / "run")
    assert result.weights.name == str(weights) and len(result.weights.sha256) == 64
    trained = torch.load(result.last_path, weights_only=True)["model"]
    backbone = {k.removeprefix("backbone."): v for k, v in trained.items() if k.startswith("backbone.")}
    expected = {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}
    assert _states_equal(backbone, expected)  # weights and BatchNorm running statistics untouched
    assert not torch.equal(trained["head.weight"], initial.head.weight)


def test_early_stopping(data: tuple[Workspace, pd.DataFrame], tmp_path: Path) -> None:
    workspace, table = data
    # lr so small the weights cannot change: val loss stays equal, which is no improvement.
    config = _config(epochs=6, head_only_epochs=6, lr=1e-12, weight_decay=0.0, patience=1)
    result = train_lib.train_model(workspace, table, config, tmp_path / "run")
    assert result.stopped_early
    assert len(result.history) == 2 and result.best_epoch == 1


def test_resume_is_bitwise_identical(data: tuple[Workspace, pd.DataFrame], tmp_path: Path) -> None:
    workspace, table = data
    config = _config(epochs=3, head_only_epochs=1)
    full = train_lib.train_model(workspace, table, config, tmp_path / "full")
    partial = train_lib.train_model(workspace, table, config, tmp_path / "crash", stop_after_epoch=2)
    assert len(partial.history) == 2 and partial.resumed_from_epoch is None
    resumed = train_lib.train_model(workspace, table, config, tmp_path / "crash")
    assert resumed.resumed_from_epoch == 2
    assert [vars(e) | {"seconds": 0} for e in resumed.history] == [vars(e) | {"seconds": 0} for e in full.history]
    for name in ("best.pt", "last.pt"):
        first = torch.load(tmp_path / "full" / name, weights_only=True)
        second = torch.load(tmp_path / "crash" / name, weights_only=True)
        key = "state_dict" if name == "best.pt" else "model"
        assert _states_equal(first[key], second[key]), name
    before = (tmp_path / "crash" / "last.pt").stat().st_mtime_ns
    again = train_lib.train_model(workspace, table, config, tmp_path / "crash")  # finished: nothing to do
    assert (tmp_path / "crash" / "last.pt").stat().st_mtime_ns == before
    assert again.best_epoch == full.best_epoch and len(again.history) == 3


def test_other_settings_in_same_folder_refused(data: tuple[Workspace, pd.DataFrame], tmp_path: Path) -> None:
    workspace, table = data
    train_lib.train_model(workspace, table, _config(epochs=1), tmp_path / "run")
    with pytest.raises(ValueError, match="other settings"):
        train_lib.train_model(workspace, table, _config(epochs=1, lr=0.02), tmp_path / "run")


def test_empty_val_split(data: tuple[Workspace, pd.DataFrame], tmp_path: Path) -> None:
    workspace, table = data
    no_val = table[table["split"] != "val"]
    with pytest.raises(ValueError, match="val") as caught:
        train_lib.train_model(workspace, no_val, _config(), tmp_path / "run")
    assert "train=16" in str(caught.value) and "val=0" in str(caught.value)
    no_train = table.assign(status=np.where(table["split"] == "train", "rejected", table["status"]))
    with pytest.raises(ValueError, match="train split is empty"):
        train_lib.train_model(workspace, no_train, _config(), tmp_path / "run")


def test_augmentation_is_seeded_and_keeps_dtype() -> None:
    augment = train_lib.build_augmentation(AugmentConfig())
    images = torch.randint(0, 256, (3, SIZE, SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(5)
    first = augment(images)
    torch.manual_seed(5)
    assert torch.equal(first, augment(images)) and first.dtype == torch.uint8 and first.shape == images.shape
    with pytest.raises(ValueError, match="affine_scale_min"):
        train_lib.build_augmentation(AugmentConfig(affine_scale_min=1.2, affine_scale_max=1.0))


def test_cuda_request_without_gpu() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert train_lib.resolve_device("auto") == "cpu"
    with pytest.raises(RuntimeError, match="cuda"):
        train_lib.resolve_device("cuda")


def test_epoch_logging(data: tuple[Workspace, pd.DataFrame], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    workspace, table = data
    with caplog.at_level(logging.INFO, logger="pipeline_lib.train"):
        train_lib.train_model(workspace, table, _config(epochs=1), tmp_path / "run")
    assert any("epoch 1/1" in record.getMessage() for record in caplog.records)
