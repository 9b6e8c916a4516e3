"""The CUDA path of pipeline_lib.learn.train, augment, evaluate, report and predict: bf16/fp16 autocast, channels_last,
torch.compile, pinned loaders, augmentation on the GPU, the CUDA RNG in last.pt, every model stage on the GPU.
Skipped without a GPU (CI has none); run on a GPU machine with `pytest tests/learn/test_train_cuda.py` (or
benchmarks/gpu_check.sh, which also runs the GPU benchmarks)."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipeline_lib.assess.cam import cam_attention_metrics, compute_cams
from pipeline_lib.assess.evaluate import predict_probabilities, robustness_metrics
from pipeline_lib.assess.predict import predict_files
from pipeline_lib.core import devices
from pipeline_lib.core.config import AugmentConfig
from pipeline_lib.core.workspace import Workspace
from pipeline_lib.learn import augment, models, steps
from pipeline_lib.learn.history import EpochStats
from pipeline_lib.learn.preprocess import load_tensors
from pipeline_lib.learn.train import build_initial_model, resolve_device, train_model
from tests.learn.test_augment import _params, _photos
from tests.learn.test_train import SIZE, _config, _dataset, _untimed

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Workspace, pd.DataFrame]:
    workspace = Workspace.create(tmp_path_factory.mktemp("cuda") / "ws")
    return workspace, _dataset(workspace)


def _test_images(workspace: Workspace, table: pd.DataFrame) -> torch.Tensor:
    rows = table[table["split"] != "train"]
    return load_tensors(workspace, rows["sha256"].tolist(), SIZE)


def test_resolve_device_and_precision_on_this_gpu() -> None:
    assert resolve_device("auto") == "cuda" and resolve_device("cuda") == "cuda"
    assert resolve_device("cuda:0") == "cuda:0"
    major, _ = torch.cuda.get_device_capability(0)
    assert devices.resolve_precision("auto", "cuda") == ("bf16" if major >= 8 else "fp16")
    assert devices.resolve_num_workers("auto", "cuda") == min(8, max(0, devices.usable_cpu_count() - 1))


def test_learns_on_cuda_and_checkpoints_load_on_cpu(data: tuple[Workspace, pd.DataFrame], tmp_path: Path) -> None:
    workspace, table = data
    config = _config(device="cuda", epochs=5, head_only_epochs=4, backbone_lr=1e-4)
    result = train_model(workspace, table, config, tmp_path / "run")
    assert result.device == "cuda" and [e.phase for e in result.history] == ["head"] * 4 + ["all"]
    assert result.augment_on == "device" and result.precision == devices.resolve_precision("auto", "cuda")
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
    model, _ = build_initial_model(_config(device="cuda"))
    model.to("cuda").to(memory_format=torch.channels_last)
    batch = _test_images(workspace, table)[:4]
    inputs = steps._to_input(batch, "cuda")
    assert inputs.is_contiguous(memory_format=torch.channels_last) and inputs.dtype == torch.float32
    with steps._autocast("cuda", "bf16"):
        logits = model(inputs)
    assert logits.dtype == torch.bfloat16 and logits.shape == (4, 2)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32


def test_compiled_training_saves_plain_state_dicts(data: tuple[Workspace, pd.DataFrame], tmp_path: Path) -> None:
    workspace, table = data
    config = _config(device="cuda", epochs=2, head_only_epochs=1, compile=True)
    result = train_model(workspace, table, config, tmp_path / "run", stop_after_epoch=1)
    best = torch.load(result.best_path, weights_only=True)["state_dict"]
    assert not any("_orig_mod" in key for key in best)
    models.load_model(result.best_path)  # loads into an uncompiled Classifier
    resumed = train_model(workspace, table, config.model_copy(update={"compile": False}), tmp_path / "run")
    assert resumed.resumed_from_epoch == 1 and len(resumed.history) == 2


def test_resume_on_cuda_and_move_to_cpu(data: tuple[Workspace, pd.DataFrame], tmp_path: Path) -> None:
    workspace, table = data
    config = _config(device="cuda", epochs=3, head_only_epochs=1)
    partial = train_model(workspace, table, config, tmp_path / "run", stop_after_epoch=1)
    resumed = train_model(workspace, table, config, tmp_path / "run", stop_after_epoch=2)
    assert resumed.resumed_from_epoch == 1 and _untimed(resumed.history[:1]) == _untimed(partial.history)
    # device is a runtime setting: the run started on the GPU finishes on the CPU from the same last.pt.
    on_cpu = train_model(workspace, table, config.model_copy(update={"device": "cpu"}), tmp_path / "run")
    assert on_cpu.device == "cpu" and on_cpu.resumed_from_epoch == 2 and len(on_cpu.history) == 3
    assert np.isfinite(on_cpu.history[-1].train_loss)


def test_pinned_loader_with_workers(data: tuple[Workspace, pd.DataFrame], tmp_path: Path) -> None:
    workspace, table = data
    config = _config(device="cuda", epochs=1, num_workers=2)
    result = train_model(workspace, table, config, tmp_path / "run")
    assert len(result.history) == 1 and result.history[0].images_per_second > 0
    assert not multiprocessing.active_children()


def test_evaluation_and_gradcam_on_cuda_match_cpu(data: tuple[Workspace, pd.DataFrame], tmp_path: Path) -> None:
    workspace, table = data
    result = train_model(workspace, table, _config(device="cuda", epochs=2), tmp_path / "run")
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


@pytest.mark.parametrize("name", ["recipe", "degradations"])
def test_augmentation_on_the_gpu_matches_the_cpu(name: str) -> None:
    from tests.learn.test_augment import CONFIGS

    config, images = CONFIGS[name], _photos(64)
    with torch.random.fork_rng(devices=[]):
        params = _params(config, range(len(images)))
    on_cpu = augment.apply_params(images, params)
    on_gpu = augment.apply_params(images.cuda(), params.cuda())
    assert on_gpu.device.type == "cuda" and on_gpu.dtype == torch.uint8
    jpeg = params[:, augment.PARAM_NAMES.index("jpeg_quality")] > 0
    same = ~jpeg  # nvjpeg and libjpeg encode differently; everything before JPEG is plain float math
    differ = (on_gpu.cpu()[same].int() - on_cpu[same].int()).abs()
    assert (differ > 0).float().mean() < 0.005 and differ.float().mean() < 0.05
    if jpeg.any():
        assert (on_gpu.cpu()[jpeg].int() - on_cpu[jpeg].int()).abs().float().mean() < 3


def test_fp16_with_a_scaler_and_the_cuda_rng_in_last_pt(data: tuple[Workspace, pd.DataFrame], tmp_path: Path) -> None:
    workspace, table = data
    augment_config = AugmentConfig(rotation_degrees=5, affine_translate=0.05, autocontrast_p=0.0, blur_p=0.5)
    config = _config(device="cuda:0", epochs=3, head_only_epochs=1, precision="fp16", augment=augment_config)
    caller = torch.cuda.get_rng_state(0)
    states: list[torch.Tensor] = []

    def keep(into: list[torch.Tensor]) -> Callable[[EpochStats], None]:
        return lambda _: into.append(torch.cuda.get_rng_state(0))  # the training stream, after each epoch

    full = train_model(workspace, table, config, tmp_path / "full", on_epoch=keep(states))
    assert torch.equal(torch.cuda.get_rng_state(0), caller)  # training forks the GPU's generator
    assert full.precision == "fp16" and full.device == "cuda:0" and all(np.isfinite(e.val_loss) for e in full.history)
    train_model(workspace, table, config, tmp_path / "crash", stop_after_epoch=1)
    saved = torch.load(tmp_path / "crash" / "last.pt", weights_only=True)
    assert saved["scaler"] and saved["scaler"]["scale"] > 0 and torch.equal(saved["rng"]["cuda"], states[0])
    resumed_states: list[torch.Tensor] = []
    resumed = train_model(workspace, table, config, tmp_path / "crash", on_epoch=keep(resumed_states))
    assert resumed.resumed_from_epoch == 1 and len(resumed.history) == 3
    assert all(torch.equal(a, b) for a, b in zip(resumed_states, states[1:], strict=True))


def test_every_model_stage_on_the_gpu(data: tuple[Workspace, pd.DataFrame], tmp_path: Path) -> None:
    workspace, table = data
    model, _ = build_initial_model(_config())
    images = _test_images(workspace, table)
    labels = table[table["split"] != "train"]["label"].tolist()
    # Threshold 0.01: a random model calls everything ai on both devices, so accuracies are comparable exactly.
    gpu = robustness_metrics(model, images, labels, 0.01, batch_size=4, device="cuda")
    cpu = robustness_metrics(model, images, labels, 0.01, batch_size=4, device="cpu")
    assert gpu.keys() == cpu.keys()
    for key in cpu:
        assert abs(gpu[key] - cpu[key]) < (1e-9 if key.endswith("accuracy") else 0.1), key
    layer = models.target_layer(model)
    attention = cam_attention_metrics(model, images, layer, batch_size=4, device="cuda")
    assert attention["cam.n"] == len(images) and "cam.border_share_mean" in attention  # nan: a random model's CAMs
    path = tmp_path / "model.pt"
    models.save_checkpoint(path, model, {"image_size": SIZE})
    loaded, meta = models.load_model(path)
    files = [tmp_path / f"{i}.png" for i in range(3)]
    for file, image in zip(files, images, strict=False):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(file)
    on_gpu = predict_files(loaded, meta, files, cam_dir=tmp_path / "cams", device="cuda")
    on_cpu = predict_files(loaded, meta, files, device="cpu")
    assert [r.p_ai for r in on_gpu] == pytest.approx([r.p_ai for r in on_cpu], abs=2e-3)
    assert all(r.cam and Path(r.cam).is_file() for r in on_gpu)
    assert next(loaded.parameters()).device.type == "cpu"  # handed back where it was
