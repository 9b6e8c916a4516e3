"""Tests for pipeline_lib.learn.train on a tiny separable dataset (resnet18, 32x32, CPU)."""

from __future__ import annotations

import io
import logging
import math
import multiprocessing
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
from PIL import Image

from pipeline_lib.core import catalog as cat
from pipeline_lib.core import devices
from pipeline_lib.core.config import AugmentConfig, TrainConfig
from pipeline_lib.core.workspace import Workspace, put_in_store
from pipeline_lib.learn import checkpoints, models
from pipeline_lib.learn.datasets import CachedImages, make_loader
from pipeline_lib.learn.history import EpochStats
from pipeline_lib.learn.train import build_initial_model, resolve_device, train_model

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
def data(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Workspace, pd.DataFrame]]:
    folder = tmp_path_factory.mktemp("train")
    workspace = Workspace.create(folder / "ws")
    yield workspace, _dataset(workspace)
    shutil.rmtree(folder, ignore_errors=True)  # the checkpoints trained on it


def _states_equal(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def _untimed(history: list[EpochStats]) -> list[dict[str, object]]:
    """Epoch stats without the wall-clock fields."""
    return [vars(e) | {"seconds": 0, "images_per_second": 0} for e in history]


def test_learns_separable_data(data: tuple[Workspace, pd.DataFrame], tmp_path: Path) -> None:
    workspace, table = data
    seen: list[EpochStats] = []
    # From random weights on 16 images the head on frozen random features learns; full fine-tuning starts slowly.
    config = _config(epochs=5, head_only_epochs=4, lr=0.01, backbone_lr=1e-4)
    result = train_model(workspace, table, config, tmp_path / "run", on_epoch=seen.append)
    assert [e.epoch for e in result.history] == [1, 2, 3, 4, 5] and seen == result.history
    assert [e.phase for e in result.history] == ["head", "head", "head", "head", "all"]
    assert result.history[3].train_loss < result.history[0].train_loss
    assert result.history[3].val_loss < result.history[0].val_loss
    assert result.history[result.best_epoch - 1].val_loss == result.best_val_loss
    assert result.history[result.best_epoch - 1].val_accuracy >= 0.75
    assert result.device == "cpu" and result.resumed_from_epoch is None and not result.stopped_early
    assert result.weights == models.WeightsInfo("none", "")
    assert set(vars(result.history[0])) >= {"epoch", "phase", "train_loss", "val_loss", "val_accuracy", "lr"}
    assert all(e.images_per_second > 0 for e in result.history)
    model, meta = models.load_model(result.best_path)
    assert meta["image_size"] == SIZE and meta["model_name"] == "resnet18" and meta["epoch"] == result.best_epoch
    assert result.last_path.is_file()


def test_head_only_phase_freezes_backbone(data: tuple[Workspace, pd.DataFrame], tmp_path: Path) -> None:
    workspace, table = data
    source = torchvision.models.resnet18()
    weights = tmp_path / "init.pt"
    torch.save(source.state_dict(), weights)
    config = _config(epochs=2, head_only_epochs=2, weights=str(weights), lr=0.05)
    initial, _ = build_initial_model(config)
    result = train_model(workspace, table, config, tmp_path / "run")
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
    result = train_model(workspace, table, config, tmp_path / "run")
    assert result.stopped_early
    assert len(result.history) == 2 and result.best_epoch == 1


def test_resume_is_bitwise_identical(data: tuple[Workspace, pd.DataFrame], tmp_path: Path) -> None:
    workspace, table = data
    config = _config(epochs=3, head_only_epochs=1)
    full = train_model(workspace, table, config, tmp_path / "full")
    partial = train_model(workspace, table, config, tmp_path / "crash", stop_after_epoch=2)
    assert len(partial.history) == 2 and partial.resumed_from_epoch is None
    resumed = train_model(workspace, table, config, tmp_path / "crash")
    assert resumed.resumed_from_epoch == 2
    assert _untimed(resumed.history) == _untimed(full.history)
    for name in ("best.pt", "last.pt"):
        first = torch.load(tmp_path / "full" / name, weights_only=True)
        second = torch.load(tmp_path / "crash" / name, weights_only=True)
        key = "state_dict" if name == "best.pt" else "model"
        assert _states_equal(first[key], second[key]), name
    before = (tmp_path / "crash" / "last.pt").stat().st_mtime_ns
    again = train_model(workspace, table, config, tmp_path / "crash")  # finished: nothing to do
    assert (tmp_path / "crash" / "last.pt").stat().st_mtime_ns == before
    assert again.best_epoch == full.best_epoch and len(again.history) == 3


def test_without_resume_a_finished_run_trains_again_from_epoch_0(
    data: tuple[Workspace, pd.DataFrame], tmp_path: Path
) -> None:
    workspace, table = data
    config = _config(epochs=2, head_only_epochs=1)
    first = train_model(workspace, table, config, tmp_path / "run")
    stamps = {name: (tmp_path / "run" / name).stat().st_mtime_ns for name in ("best.pt", "last.pt")}
    fresh = train_model(workspace, table, config, tmp_path / "run", resume=False)
    assert fresh.resumed_from_epoch is None and [e.epoch for e in fresh.history] == [1, 2]
    assert all((tmp_path / "run" / name).stat().st_mtime_ns != stamp for name, stamp in stamps.items()), "not rewritten"
    assert _untimed(fresh.history) == _untimed(first.history), "a fresh start repeats the same seeded run"


def test_other_settings_in_same_folder_refused(data: tuple[Workspace, pd.DataFrame], tmp_path: Path) -> None:
    workspace, table = data
    train_model(workspace, table, _config(epochs=1), tmp_path / "run")
    with pytest.raises(ValueError, match="other settings"):
        train_model(workspace, table, _config(epochs=1, lr=0.02), tmp_path / "run")


def test_empty_val_split(data: tuple[Workspace, pd.DataFrame], tmp_path: Path) -> None:
    workspace, table = data
    no_val = table[table["split"] != "val"]
    with pytest.raises(ValueError, match="val") as caught:
        train_model(workspace, no_val, _config(), tmp_path / "run")
    assert "train=16" in str(caught.value) and "val=0" in str(caught.value)
    no_train = table.assign(status=np.where(table["split"] == "train", "rejected", table["status"]))
    with pytest.raises(ValueError, match="train split is empty"):
        train_model(workspace, no_train, _config(), tmp_path / "run")


def test_cuda_request_without_gpu() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert resolve_device("auto") == "cpu"
    with pytest.raises(RuntimeError, match="cuda"):
        resolve_device("cuda")


def test_epoch_logging(data: tuple[Workspace, pd.DataFrame], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    workspace, table = data
    with caplog.at_level(logging.INFO, logger="pipeline_lib.learn.train"):
        train_model(workspace, table, _config(epochs=1), tmp_path / "run")
    assert any("epoch 1/1" in record.getMessage() for record in caplog.records)


def test_resume_with_cosine_schedule_is_bitwise_identical(data: tuple[Workspace, pd.DataFrame], tmp_path: Path) -> None:
    workspace, table = data
    config = _config(epochs=3, head_only_epochs=1, schedule="cosine", backbone_lr=0.002, label_smoothing=0.1)
    full = train_model(workspace, table, config, tmp_path / "full")
    expected = [0.01 * (1 + math.cos(math.pi * k / 3)) / 2 for k in range(3)]  # lr each epoch trained with
    assert [e.lr for e in full.history] == pytest.approx(expected)
    train_model(workspace, table, config, tmp_path / "crash", stop_after_epoch=2)
    saved = torch.load(tmp_path / "crash" / "last.pt", weights_only=True)
    assert saved["scheduler"]["last_epoch"] == 2
    assert [g["lr"] for g in saved["optimizer"]["param_groups"]] == pytest.approx([expected[2], expected[2] / 5])
    resumed = train_model(workspace, table, config, tmp_path / "crash")
    assert resumed.resumed_from_epoch == 2 and _untimed(resumed.history) == _untimed(full.history)
    for name, key in (("best.pt", "state_dict"), ("last.pt", "model")):
        first = torch.load(tmp_path / "full" / name, weights_only=True)[key]
        assert _states_equal(first, torch.load(tmp_path / "crash" / name, weights_only=True)[key]), name
    final = torch.load(tmp_path / "crash" / "last.pt", weights_only=True)
    assert final["scheduler"] == torch.load(tmp_path / "full" / "last.pt", weights_only=True)["scheduler"]


def test_step_schedule_scales_both_groups(data: tuple[Workspace, pd.DataFrame], tmp_path: Path) -> None:
    workspace, table = data
    config = _config(epochs=2, head_only_epochs=1, schedule="step", step_size=1, gamma=0.5, backbone_lr=0.004)
    result = train_model(workspace, table, config, tmp_path / "run")
    assert [e.lr for e in result.history] == pytest.approx([0.01, 0.005])
    groups = torch.load(result.last_path, weights_only=True)["optimizer"]["param_groups"]
    assert [g["lr"] for g in groups] == pytest.approx([0.0025, 0.001])  # after the step at the end of epoch 2


def test_workers_give_the_same_run(data: tuple[Workspace, pd.DataFrame], tmp_path: Path) -> None:
    workspace, table = data
    config = _config(epochs=2, head_only_epochs=1)
    single = train_model(workspace, table, config, tmp_path / "w0")
    pooled = train_model(workspace, table, config.model_copy(update={"num_workers": 2}), tmp_path / "w2")
    assert _untimed(pooled.history) == _untimed(single.history)  # persistent workers still see each epoch
    assert not multiprocessing.active_children()  # the persistent workers were stopped
    first = torch.load(single.last_path, weights_only=True)["model"]
    assert _states_equal(first, torch.load(pooled.last_path, weights_only=True)["model"])


def test_compile_is_ignored_on_cpu(
    data: tuple[Workspace, pd.DataFrame], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    workspace, table = data
    with caplog.at_level(logging.INFO, logger="pipeline_lib.learn.steps"):
        result = train_model(workspace, table, _config(epochs=1, compile=True), tmp_path / "run")
    assert any("compile ignored on cpu" in record.getMessage() for record in caplog.records)
    assert len(result.history) == 1
    # compile is a runtime setting: the same folder continues without it.
    again = train_model(workspace, table, _config(epochs=1), tmp_path / "run")
    assert again.resumed_from_epoch == 1


def test_all_layers_train_for_patience_epochs_after_a_stalled_head_phase(
    data: tuple[Workspace, pd.DataFrame], tmp_path: Path
) -> None:
    workspace, table = data
    # The head's lr is too small to change a float32 weight: val loss is identical over the head-only epochs,
    # which alone would exhaust patience 2 by epoch 3. The backbone trains at a real lr once unfrozen.
    config = _config(epochs=9, head_only_epochs=3, lr=1e-12, backbone_lr=0.05, weight_decay=0.0, patience=2)
    initial, _ = build_initial_model(config)
    result = train_model(workspace, table, config, tmp_path / "run")
    head = [e for e in result.history if e.phase == "head"]
    full = [e for e in result.history if e.phase == "all"]
    assert len(head) == 3 and len({e.val_loss for e in head}) == 1, "the head-only phase should stall"
    assert len(full) >= config.patience, f"all layers trained only {len(full)} epochs: {_untimed(result.history)}"
    trained = torch.load(result.last_path, weights_only=True)["model"]
    first_conv = "backbone.conv1.weight"
    assert not torch.equal(trained[first_conv], initial.state_dict()[first_conv]), "the backbone never changed"
    if result.stopped_early:
        assert result.history[-1].phase == "all"


def _level(rng: np.random.Generator, value: float) -> np.ndarray:
    """A flat image of brightness value with a little noise."""
    return np.clip(value + rng.integers(-12, 13, size=(40, 40, 3)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def imbalanced(tmp_path_factory: pytest.TempPathFactory) -> tuple[Workspace, pd.DataFrame]:
    """4:1 real to ai in train; overlapping brightness (real 40-170, ai 90-220); balanced val and test."""
    workspace = Workspace.create(tmp_path_factory.mktemp("imbalanced") / "ws")
    rng = np.random.default_rng(0)
    records = []
    for split, per_label in (
        ("train", {"real": 40, "ai": 10}),
        ("val", {"real": 8, "ai": 8}),
        ("test", {"real": 20, "ai": 20}),
    ):
        for label, count in per_label.items():
            for i in range(count):
                value = rng.uniform(40, 170) if label == "real" else rng.uniform(90, 220)
                buffer = io.BytesIO()
                Image.fromarray(_level(rng, value)).save(buffer, "PNG")
                sha, path = put_in_store(workspace, buffer.getvalue(), "png")
                group = f"{label}-{split}-{i % 2}"
                records.append(
                    {"sha256": sha, "path": workspace.relative(path), "label": label, "group": group}
                    | {"status": "ok", "split": split}
                )
    return workspace, cat.new_rows(records)


def test_class_balance_raises_minority_recall(imbalanced: tuple[Workspace, pd.DataFrame], tmp_path: Path) -> None:
    from pipeline_lib.assess import evaluate
    from pipeline_lib.learn import preprocess

    workspace, table = imbalanced
    test = table[table["split"] == "test"]
    images = preprocess.load_tensors(workspace, test["sha256"].tolist(), 16)
    is_ai = (test["label"] == "ai").to_numpy()
    augment = AugmentConfig(rotation_degrees=0, affine_translate=0.0, autocontrast_p=0.0)
    recall: dict[str, float] = {}
    for mode in ("none", "weighted", "undersample"):
        config = _config(
            image_size=16, batch_size=10, epochs=3, head_only_epochs=3, augment=augment, class_balance=mode
        )
        result = train_model(workspace, table, config, tmp_path / mode)
        model, _ = models.load_model(result.best_path)
        p_ai = evaluate.predict_probabilities(model, images)
        recall[mode] = float((p_ai[is_ai] >= 0.5).mean())
        assert result.balance["real.images"] == 40 and result.balance["ai.images"] == 10
        if mode == "weighted":
            assert result.balance["real.weight"] == pytest.approx(0.625) and result.balance["ai.weight"] == 2.5
        if mode == "undersample":
            assert result.balance["images_per_epoch"] == 20 and result.balance["ai.weight"] == 1.0
    assert recall["weighted"] > recall["none"] and recall["undersample"] > recall["none"], recall


def test_augmenting_on_the_device_continues_the_same_run(data: tuple[Workspace, pd.DataFrame], tmp_path: Path) -> None:
    workspace, table = data
    augment = AugmentConfig(rotation_degrees=10, affine_translate=0.1, autocontrast_p=0.0, blur_p=0.5, jpeg_p=0.5)
    config = _config(epochs=2, head_only_epochs=1, augment=augment, augment_on="loader")
    loader = train_model(workspace, table, config, tmp_path / "loader")
    on_device = config.model_copy(update={"augment_on": "device"})
    device = train_model(workspace, table, on_device, tmp_path / "device")
    assert (loader.augment_on, device.augment_on) == ("loader", "device")
    # The workers draw each sample's parameters with the loader path's seeds: the same images, the same run.
    assert _untimed(device.history) == _untimed(loader.history)
    first = torch.load(loader.last_path, weights_only=True)["model"]
    assert _states_equal(first, torch.load(device.last_path, weights_only=True)["model"])
    # Where augmentation runs is a runtime setting: a run started in the loader finishes on the device.
    train_model(workspace, table, config, tmp_path / "switch", stop_after_epoch=1)
    switched = train_model(workspace, table, on_device, tmp_path / "switch")
    assert switched.resumed_from_epoch == 1 and _untimed(switched.history) == _untimed(loader.history)


def test_bf16_autocast_on_the_cpu(data: tuple[Workspace, pd.DataFrame], tmp_path: Path) -> None:
    workspace, table = data
    result = train_model(workspace, table, _config(epochs=1, precision="bf16"), tmp_path / "run")
    assert result.precision == "bf16" and np.isfinite(result.history[0].train_loss)
    assert train_model(workspace, table, _config(epochs=1), tmp_path / "fp32").precision == "fp32"
    with pytest.raises(ValueError, match="fp16 needs a CUDA GPU"):
        train_model(workspace, table, _config(epochs=1, precision="fp16"), tmp_path / "fp16")


def test_num_workers_auto_and_rng_state(data: tuple[Workspace, pd.DataFrame], tmp_path: Path) -> None:
    workspace, table = data
    rows = table[table["split"] == "train"].reset_index(drop=True)
    dataset = CachedImages(workspace, rows["sha256"].tolist(), [0] * len(rows), SIZE)
    loader = make_loader(dataset, _config(num_workers="auto"), shuffle=False, device="cpu")
    assert loader.num_workers == devices.choose_num_workers("auto", devices.usable_cpu_count(), "cpu")
    assert set(checkpoints._rng_state("cpu")) == {"torch"}
    config = _config(epochs=2, head_only_epochs=1)
    full = train_model(workspace, table, config, tmp_path / "full")
    train_model(workspace, table, config, tmp_path / "gpu-run", stop_after_epoch=1)
    state = torch.load(tmp_path / "gpu-run" / "last.pt", weights_only=True)
    assert set(state["rng"]) == {"torch"} and state["scaler"] is None
    state["rng"]["cuda"] = torch.zeros(16, dtype=torch.uint8)  # as a GPU run saves it; ignored on the CPU
    torch.save(state, tmp_path / "gpu-run" / "last.pt")
    resumed = train_model(workspace, table, config, tmp_path / "gpu-run")
    assert resumed.resumed_from_epoch == 1 and _untimed(resumed.history) == _untimed(full.history)


