"""The CUDA path of pipeline_lib.train, evaluate and report: bf16 autocast, channels_last, torch.compile, pinned
loaders. Skipped without a GPU (CI has none); run on a GPU machine with `pytest tests/test_train_cuda.py`."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline_lib import models
from pipeline_lib import train as train_lib
from pipeline_lib.evaluate import predict_probabilities
from pipeline_lib.preprocess import load_tensors
from pipeline_lib.report import compute_cams
from pipeline_lib.workspace import Workspace
from tests.test_train import SIZE, _config, _dataset, _untimed

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Workspace, pd.DataFrame]:
    workspace = Workspace.create(tmp_path_factory.mktemp("cuda") / "ws")
    return workspace, _dataset(workspace)


def _test_images(workspace: Workspace, table: pd.DataFrame) -> torch.Tensor:
    rows = table[table["split"] != "train"]
    return load_tensors(workspace, rows["sha256"].tolist(), SIZE)


def test_resolve_device_prefers_the_gpu() -> None:
    assert train_lib.resolve_device("auto") == "cuda" and train_lib.resolve_device("cuda") == "cuda"


def test_learns_on_cuda_and_checkpoints_load_on_cpu(data: tuple[Workspace, pd.DataFrame], tmp_path: Path) -> None:
    workspace, table = data
    config = _config(device="cuda", epochs=5, head_only_epochs=4, backbone_lr=1e-4)
    result = train_lib.train_model(workspace, table, config, tmp_path / "run")
    assert result.device == "cuda" and [e.phase for e in result.history] == ["head"] * 4 + ["all"]
    assert result.history[3].train_loss < result.history[0].train_loss
    assert result.history[result.best_epoch - 1].val_accuracy >= 0.75
    assert all(np.isfinite(e.train_loss) and np.isfinite(e.val_loss) for e in result.history)
    model, meta = models.load_model(result.best_path)
    assert meta["epoch"] == result.best_epoch
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())
    state = torch.load(result.last_path, weights_only=True)  # no map_location: must load without a GPU too
    assert all(v.device.type == "cpu" for v in state["model"].values())


def test_bf16_and_channels_last_inside_a_step(data: tuple[Workspace, pd.DataFrame]) -> None:
    workspace, table = data
    model, _ = train_lib.build_initial_model(_config(device="cuda"))
    model.to("cuda").to(memory_format=torch.channels_last)
    batch = _test_images(workspace, table)[:4]
    inputs = train_lib._to_input(batch, "cuda")
    assert inputs.is_contiguous(memory_format=torch.channels_last) and inputs.dtype == torch.float32
    with train_lib._autocast("cuda"):
        logits = model(inputs)
    assert logits.dtype == torch.bfloat16 and logits.shape == (4, 2)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32


def test_compiled_training_saves_plain_state_dicts(data: tuple[Workspace, pd.DataFrame], tmp_path: Path) -> None:
    workspace, table = data
    config = _config(device="cuda", epochs=2, head_only_epochs=1, compile=True)
    result = train_lib.train_model(workspace, table, config, tmp_path / "run", stop_after_epoch=1)
    best = torch.load(result.best_path, weights_only=True)["state_dict"]
    assert not any("_orig_mod" in key for key in best)
    models.load_model(result.best_path)  # loads into an uncompiled Classifier
    resumed = train_lib.train_model(workspace, table, config.model_copy(update={"compile": False}), tmp_path / "run")
    assert resumed.resumed_from_epoch == 1 and len(resumed.history) == 2


def test_resume_on_cuda_and_move_to_cpu(data: tuple[Workspace, pd.DataFrame], tmp_path: Path) -> None:
    workspace, table = data
    config = _config(device="cuda", epochs=3, head_only_epochs=1)
    partial = train_lib.train_model(workspace, table, config, tmp_path / "run", stop_after_epoch=1)
    resumed = train_lib.train_model(workspace, table, config, tmp_path / "run", stop_after_epoch=2)
    assert resumed.resumed_from_epoch == 1 and _untimed(resumed.history[:1]) == _untimed(partial.history)
    # device is a runtime setting: the run started on the GPU finishes on the CPU from the same last.pt.
    on_cpu = train_lib.train_model(workspace, table, config.model_copy(update={"device": "cpu"}), tmp_path / "run")
    assert on_cpu.device == "cpu" and on_cpu.resumed_from_epoch == 2 and len(on_cpu.history) == 3
    assert np.isfinite(on_cpu.history[-1].train_loss)


def test_pinned_loader_with_workers(data: tuple[Workspace, pd.DataFrame], tmp_path: Path) -> None:
    workspace, table = data
    config = _config(device="cuda", epochs=1, num_workers=2)
    result = train_lib.train_model(workspace, table, config, tmp_path / "run")
    assert len(result.history) == 1 and result.history[0].images_per_second > 0
    assert not multiprocessing.active_children()


def test_evaluation_and_gradcam_on_cuda_match_cpu(data: tuple[Workspace, pd.DataFrame], tmp_path: Path) -> None:
    workspace, table = data
    result = train_lib.train_model(workspace, table, _config(device="cuda", epochs=2), tmp_path / "run")
    model, _ = models.load_model(result.best_path)
    images = _test_images(workspace, table)
    on_gpu = predict_probabilities(model, images, batch_size=4, device="cuda")
    on_cpu = predict_probabilities(model, images, batch_size=4, device="cpu")
    np.testing.assert_allclose(on_gpu, on_cpu, atol=2e-3)
    assert next(model.parameters()).device.type == "cpu"  # the model is handed back where it was
    layer = models.target_layer(model)
    cams_gpu = compute_cams(model, images, layer, batch_size=4, device="cuda")
    cams_cpu = compute_cams(model, images, layer, batch_size=4, device="cpu")
    assert cams_gpu.shape == (len(images), SIZE, SIZE) and cams_gpu.dtype == np.float32
    assert float(np.abs(cams_gpu - cams_cpu).mean()) < 0.02
