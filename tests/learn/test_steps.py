"""Tests for pipeline_lib.learn.steps: one training pass and its optimizer step (resnet18, 32x32, CPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline_lib.core.workspace import Workspace
from pipeline_lib.learn.datasets import make_dataset, make_loader
from pipeline_lib.learn.steps import make_optimizer, train_epoch
from pipeline_lib.learn.train import build_initial_model
from tests.learn.test_train import _config, _dataset


def test_fp16_step_goes_through_the_gradient_scaler(tmp_path: Path) -> None:
    workspace = Workspace.create(tmp_path / "ws")
    table = _dataset(workspace)
    rows = table[table["split"] == "train"].reset_index(drop=True)
    config = _config()
    loader = make_loader(make_dataset(workspace, rows, config, True, None), config, True, "cpu")
    model, _ = build_initial_model(config)
    optimizer = make_optimizer(model, config)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    before = model.head.weight.detach().clone()
    loss, accuracy = train_epoch(model, loader, optimizer, "cpu", precision="fp16", scaler=scaler)
    assert np.isfinite(loss) and 0 <= accuracy <= 1
    assert not torch.equal(model.head.weight, before) and model.head.weight.dtype == torch.float32
    assert scaler.get_scale() == 2.0**12  # two finite steps, each growing the scale once
