"""Tests for pipeline_lib.core.devices: device, precision and worker choices from capability flags (any machine)."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from pipeline_lib.core import devices
from pipeline_lib.core.config import TrainConfig


def test_auto_prefers_cuda_then_mps_then_cpu() -> None:
    assert devices.choose_device("auto", cuda_count=2, mps_available=True) == "cuda"
    assert devices.choose_device("auto", cuda_count=0, mps_available=True) == "mps"
    assert devices.choose_device("auto", cuda_count=0, mps_available=False) == "cpu"
    assert devices.choose_device("cpu", cuda_count=4, mps_available=True) == "cpu"


def test_explicit_devices_are_checked_against_the_machine() -> None:
    assert devices.choose_device("cuda:1", cuda_count=2, mps_available=False) == "cuda:1"
    assert devices.choose_device("cuda", cuda_count=1, mps_available=False) == "cuda"
    assert devices.choose_device("mps", cuda_count=0, mps_available=True) == "mps"
    with pytest.raises(RuntimeError, match="only 2 CUDA device"):
        devices.choose_device("cuda:2", cuda_count=2, mps_available=False)
    with pytest.raises(RuntimeError, match="no CUDA device"):
        devices.choose_device("cuda:0", cuda_count=0, mps_available=True)
    with pytest.raises(RuntimeError, match="MPS"):
        devices.choose_device("mps", cuda_count=1, mps_available=False)
    for bad in ("gpu", "cuda:", "cuda:x", "CPU", ""):
        with pytest.raises(ValueError, match="cuda:N"):
            devices.choose_device(bad, cuda_count=1, mps_available=True)


def test_resolve_on_this_machine() -> None:
    expected = "cuda" if torch.cuda.is_available() else "mps" if devices._mps_available() else "cpu"
    assert devices.resolve_device("auto") == expected
    assert devices.resolve_device("cpu") == "cpu" and devices.device_type("cuda:3") == "cuda"
    assert devices.resolve_precision("auto", "cpu") == "fp32"


def test_auto_precision_per_device_and_gpu() -> None:
    assert devices.choose_precision("auto", "cuda", bf16_supported=True) == "bf16"  # A100, H100, RTX 30xx+
    assert devices.choose_precision("auto", "cuda", bf16_supported=False) == "fp16"  # T4, V100
    assert devices.choose_precision("auto", "cpu", bf16_supported=False) == "fp32"
    assert devices.choose_precision("auto", "mps", bf16_supported=False) == "fp32"


def test_explicit_precision_is_checked() -> None:
    assert devices.choose_precision("fp32", "cuda", bf16_supported=True) == "fp32"
    assert devices.choose_precision("fp16", "cuda", bf16_supported=True) == "fp16"
    assert devices.choose_precision("bf16", "cpu", bf16_supported=False) == "bf16"  # CPU autocast has bf16
    with pytest.raises(ValueError, match="no native bf16"):
        devices.choose_precision("bf16", "cuda", bf16_supported=False)
    with pytest.raises(ValueError, match="fp16 needs a CUDA GPU"):
        devices.choose_precision("fp16", "cpu", bf16_supported=False)
    with pytest.raises(ValueError, match="mps"):
        devices.choose_precision("bf16", "mps", bf16_supported=False)
    with pytest.raises(ValueError, match="auto, bf16, fp16, fp32"):
        devices.choose_precision("fp8", "cuda", bf16_supported=True)


def test_scaler_only_for_fp16_and_autocast_dtypes() -> None:
    assert isinstance(devices.grad_scaler("cpu", "fp16"), torch.amp.GradScaler)
    assert devices.grad_scaler("cpu", "bf16") is None and devices.grad_scaler("cuda", "fp32") is None
    layer = torch.nn.Linear(4, 2)
    with devices.autocast("cpu", "bf16"):
        assert layer(torch.rand(3, 4)).dtype == torch.bfloat16
    with devices.autocast("cpu", "fp32"):
        assert layer(torch.rand(3, 4)).dtype == torch.float32


def test_num_workers_auto_from_cpu_count() -> None:
    assert devices.choose_num_workers("auto", cpu_count=16, kind="cuda") == 8
    assert devices.choose_num_workers("auto", cpu_count=4, kind="cuda") == 3
    assert devices.choose_num_workers("auto", cpu_count=1, kind="cuda") == 0
    assert devices.choose_num_workers("auto", cpu_count=10, kind="mps") == 8
    assert devices.choose_num_workers("auto", cpu_count=32, kind="cpu") == 4
    assert devices.choose_num_workers("auto", cpu_count=2, kind="cpu") == 0  # the model step needs both cores
    assert devices.choose_num_workers(5, cpu_count=2, kind="cpu") == 5
    with pytest.raises(ValueError, match="num_workers"):
        devices.choose_num_workers(-1, cpu_count=2, kind="cpu")
    expected = devices.choose_num_workers("auto", devices.usable_cpu_count(), "cpu")
    assert devices.resolve_num_workers("auto", "cpu") == expected


def test_train_config_accepts_the_new_forms() -> None:
    config = TrainConfig(device="cuda:1", precision="fp16", num_workers=3, augment_on="device")
    assert (config.device, config.precision, config.num_workers, config.augment_on) == ("cuda:1", "fp16", 3, "device")
    assert TrainConfig().num_workers == "auto" and TrainConfig().precision == "auto"
    assert TrainConfig(weights_url="https://mirror.example/resnet50-11ad3fa6.pth").weights_url
    for bad in ({"device": "gpu"}, {"num_workers": -2}, {"num_workers": "many"}, {"precision": "half"}):
        with pytest.raises(ValidationError):
            TrainConfig(**bad)
    with pytest.raises(ValidationError, match="sha256 prefix"):
        TrainConfig(weights_url="https://mirror.example/resnet50.pth")
