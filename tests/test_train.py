"""Tests for pipeline_lib.train on a tiny separable dataset (resnet18, 32x32, CPU)."""

from __future__ import annotations

import io
import logging
import math
import multiprocessing
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


def _untimed(history: list[train_lib.EpochStats]) -> list[dict[str, object]]:
    """Epoch stats without the wall-clock fields."""
    return [vars(e) | {"seconds": 0, "images_per_second": 0} for e in history]


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
    assert _untimed(resumed.history) == _untimed(full.history)
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


def test_resume_with_cosine_schedule_is_bitwise_identical(data: tuple[Workspace, pd.DataFrame], tmp_path: Path) -> None:
    workspace, table = data
    config = _config(epochs=3, head_only_epochs=1, schedule="cosine", backbone_lr=0.002, label_smoothing=0.1)
    full = train_lib.train_model(workspace, table, config, tmp_path / "full")
    expected = [0.01 * (1 + math.cos(math.pi * k / 3)) / 2 for k in range(3)]  # lr each epoch trained with
    assert [e.lr for e in full.history] == pytest.approx(expected)
    train_lib.train_model(workspace, table, config, tmp_path / "crash", stop_after_epoch=2)
    saved = torch.load(tmp_path / "crash" / "last.pt", weights_only=True)
    assert saved["scheduler"]["last_epoch"] == 2
    assert [g["lr"] for g in saved["optimizer"]["param_groups"]] == pytest.approx([expected[2], expected[2] / 5])
    resumed = train_lib.train_model(workspace, table, config, tmp_path / "crash")
    assert resumed.resumed_from_epoch == 2 and _untimed(resumed.history) == _untimed(full.history)
    for name, key in (("best.pt", "state_dict"), ("last.pt", "model")):
        first = torch.load(tmp_path / "full" / name, weights_only=True)[key]
        assert _states_equal(first, torch.load(tmp_path / "crash" / name, weights_only=True)[key]), name
    final = torch.load(tmp_path / "crash" / "last.pt", weights_only=True)
    assert final["scheduler"] == torch.load(tmp_path / "full" / "last.pt", weights_only=True)["scheduler"]


def test_step_schedule_scales_both_groups(data: tuple[Workspace, pd.DataFrame], tmp_path: Path) -> None:
    workspace, table = data
    config = _config(epochs=2, head_only_epochs=1, schedule="step", step_size=1, gamma=0.5, backbone_lr=0.004)
    result = train_lib.train_model(workspace, table, config, tmp_path / "run")
    assert [e.lr for e in result.history] == pytest.approx([0.01, 0.005])
    groups = torch.load(result.last_path, weights_only=True)["optimizer"]["param_groups"]
    assert [g["lr"] for g in groups] == pytest.approx([0.0025, 0.001])  # after the step at the end of epoch 2


def test_workers_give_the_same_run(data: tuple[Workspace, pd.DataFrame], tmp_path: Path) -> None:
    workspace, table = data
    config = _config(epochs=2, head_only_epochs=1)
    single = train_lib.train_model(workspace, table, config, tmp_path / "w0")
    pooled = train_lib.train_model(workspace, table, config.model_copy(update={"num_workers": 2}), tmp_path / "w2")
    assert _untimed(pooled.history) == _untimed(single.history)  # persistent workers still see each epoch
    assert not multiprocessing.active_children()  # the persistent workers were stopped
    first = torch.load(single.last_path, weights_only=True)["model"]
    assert _states_equal(first, torch.load(pooled.last_path, weights_only=True)["model"])


def test_loader_options(data: tuple[Workspace, pd.DataFrame]) -> None:
    workspace, table = data
    rows = table[table["split"] == "train"].reset_index(drop=True)
    labels = [0] * len(rows)
    dataset = train_lib.CachedImages(workspace, rows["sha256"].tolist(), labels, SIZE)
    cpu = train_lib.make_loader(dataset, _config(), shuffle=True, device="cpu")
    assert not cpu.pin_memory and not cpu.persistent_workers
    pooled = train_lib.make_loader(dataset, _config(num_workers=2), shuffle=False, device="cuda")
    assert pooled.pin_memory and pooled.persistent_workers and pooled.num_workers == 2
    sampler = cpu.sampler
    sampler.set_epoch(1)
    first = list(sampler)
    sampler.set_epoch(2)
    second = list(sampler)
    assert {key[0] for key in first} == {1} and sorted(i for _, i in first) == list(range(len(rows)))
    assert [i for _, i in first] != [i for _, i in second]
    sampler.set_epoch(1)
    assert list(sampler) == first


def test_compile_is_ignored_on_cpu(
    data: tuple[Workspace, pd.DataFrame], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    workspace, table = data
    with caplog.at_level(logging.INFO, logger="pipeline_lib.train"):
        result = train_lib.train_model(workspace, table, _config(epochs=1, compile=True), tmp_path / "run")
    assert any("compile ignored on cpu" in record.getMessage() for record in caplog.records)
    assert len(result.history) == 1
    # compile is a runtime setting: the same folder continues without it.
    again = train_lib.train_model(workspace, table, _config(epochs=1), tmp_path / "run")
    assert again.resumed_from_epoch == 1


def test_blur_and_jpeg_augmentation() -> None:
    images = torch.randint(0, 256, (3, SIZE, SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    assert len(train_lib.build_augmentation(AugmentConfig()).transforms) == 3  # p=0: the recipe is unchanged
    plain = AugmentConfig(rotation_degrees=0, hflip_p=0, autocontrast_p=0, affine_translate=0)
    identity = train_lib.build_augmentation(plain.model_copy(update={"affine_scale_min": 1, "affine_scale_max": 1}))
    degraded = train_lib.build_augmentation(
        plain.model_copy(update={"affine_scale_min": 1, "affine_scale_max": 1, "blur_p": 1.0, "jpeg_p": 1.0})
    )
    assert torch.equal(identity(images), images)
    torch.manual_seed(3)
    first = degraded(images)
    torch.manual_seed(3)
    assert torch.equal(first, degraded(images)) and first.dtype == torch.uint8 and first.shape == images.shape
    assert not torch.equal(first, images)
    # Blur smooths noise: neighbouring pixels get closer.
    assert first.float().diff(dim=2).abs().mean() < images.float().diff(dim=2).abs().mean()
    jpeg_only = train_lib.build_augmentation(
        plain.model_copy(
            update={
                "affine_scale_min": 1,
                "affine_scale_max": 1,
                "jpeg_p": 1.0,
                "jpeg_quality_min": 10,
                "jpeg_quality_max": 10,
            }
        )
    )
    buffer = io.BytesIO()
    Image.fromarray(images.permute(1, 2, 0).numpy()).save(buffer, "JPEG", quality=10)
    reference = torch.from_numpy(np.array(Image.open(buffer))).permute(2, 0, 1)
    assert (jpeg_only(images).int() - reference.int()).abs().float().mean() < 3  # a real quality-10 JPEG round trip
    with pytest.raises(ValueError, match="jpeg_quality_min"):
        train_lib.build_augmentation(
            AugmentConfig.model_construct(**{**plain.model_dump(), "jpeg_quality_min": 90, "jpeg_quality_max": 80})
        )


def test_plot_learning_curves(data: tuple[Workspace, pd.DataFrame], tmp_path: Path) -> None:
    stats = [
        train_lib.EpochStats(1, "head", 0.7, 0.5, 0.69, 0.5, 0.01, 1.0, 10.0),
        train_lib.EpochStats(2, "head", 0.6, 0.7, 0.50, 0.75, 0.01, 1.0, 10.0),
        train_lib.EpochStats(3, "all", 0.4, 0.9, 0.55, 0.75, 0.01, 1.0, 10.0),
    ]
    assert train_lib.curve_marks(stats) == (3, 2)
    path = train_lib.plot_learning_curves(stats, tmp_path / "plots" / "curves.png")
    assert path == tmp_path / "plots" / "curves.png"
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (1000, 400)
    assert [p.name for p in path.parent.iterdir()] == ["curves.png"]  # no temporary left behind
    as_dicts = [vars(e) for e in stats[::-1]]  # what the train task hands on; order does not matter
    assert train_lib.curve_marks(as_dicts) == (3, 2)
    assert train_lib.plot_learning_curves(as_dicts, tmp_path / "d.png").stat().st_size > 1000
    assert train_lib.curve_marks([vars(e) | {"phase": "all"} for e in stats]) == (None, 2)
    with pytest.raises(ValueError, match="empty"):
        train_lib.plot_learning_curves([], tmp_path / "e.png")
    with pytest.raises(ValueError, match="val_loss"):
        train_lib.plot_learning_curves([{"epoch": 1, "phase": "all"}], tmp_path / "e.png")
    assert not (tmp_path / "e.png").exists()


def test_epoch_line_says_phase_losses_speed_and_time_left():
    from pipeline_lib.train import EpochStats, describe_epoch, seconds_left

    stats = EpochStats(3, "all", 0.51234, 0.78, 0.43, 0.84, 0.01, 2.0, 412.3)
    left = seconds_left([4.0, 2.0, 3.0], epoch=3, max_epochs=30)
    assert left == 81.0
    line = describe_epoch(stats, 30, left)
    assert line.startswith("epoch 3/30 [all layers]  train loss 0.512 acc 0.780  |  val loss 0.430 acc 0.840")
    assert "412 img/s" in line and "at most 1:21 left" in line
    assert describe_epoch(stats, 3, seconds_left([2.0], 3, 3)).endswith("last epoch")
