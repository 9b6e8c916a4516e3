"""One pass of training or validation: batches onto the device, precision (autocast, gradient scaler), the optimizer
step; and the live objects of a run (model, optimizer, lr schedule) with the phase that says which layers train."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR, LRScheduler, StepLR
from torch.utils.data import DataLoader

from pipeline_lib.core import devices
from pipeline_lib.core.config import TrainConfig
from pipeline_lib.learn import augment as augment_lib
from pipeline_lib.learn.models import Classifier, WeightsInfo

log = logging.getLogger(__name__)


@dataclass
class TrainingRun:
    """The live objects of one training run."""

    model: Classifier
    forward: nn.Module  # model, or its torch.compile wrapper (same parameters)
    optimizer: torch.optim.SGD
    scheduler: LRScheduler | None
    weights: WeightsInfo
    device: str = "cpu"
    precision: str = "fp32"
    scaler: torch.amp.GradScaler | None = None  # fp16 only


def _autocast(device: str, precision: str) -> contextlib.AbstractContextManager:
    """Autocast to bf16 or fp16 on device; nothing for fp32 (keeps CPU runs bitwise reproducible)."""
    return devices.autocast(device, precision)


def _to_input(images: torch.Tensor, device: str, params: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 batch -> float [0, 1] on device (channels_last on cuda), augmented there first when params are given."""
    batch = images.to(device=device, non_blocking=True)
    if params is not None:
        batch = augment_lib.apply_params(batch, params)
    batch = batch.float().div_(255.0)
    return batch.contiguous(memory_format=torch.channels_last) if devices.is_cuda(device) else batch


def set_phase(model: Classifier, phase: str) -> None:
    """head: backbone frozen with BatchNorm in eval mode; all: everything trains."""
    train_backbone = phase == "all"
    for param in model.backbone_parameters():
        param.requires_grad_(train_backbone)
    model.train()
    if not train_backbone:
        model.backbone.eval()


def make_optimizer(model: Classifier, config: TrainConfig) -> torch.optim.SGD:
    """SGD with the head at lr and the backbone at backbone_lr (or lr)."""
    groups = [
        {"params": model.head_parameters(), "lr": config.lr},
        {"params": model.backbone_parameters(), "lr": config.backbone_lr or config.lr},
    ]
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> LRScheduler | None:
    """Per-epoch schedule over the whole run (both param groups), or None for a constant lr."""
    if config.schedule == "cosine":
        return CosineAnnealingLR(optimizer, T_max=config.epochs)
    if config.schedule == "step":
        return StepLR(optimizer, step_size=config.step_size, gamma=config.gamma)
    return None


def compiled(model: Classifier, config: TrainConfig, device: str) -> nn.Module:
    """torch.compile(model) when asked and on cuda; the model itself otherwise."""
    if not config.compile:
        return model
    if not devices.is_cuda(device):
        log.info("train.compile ignored on %s: torch.compile is only used on CUDA", device)
        return model
    log.info("compiling the model with torch.compile (the first steps are slow)")
    return torch.compile(model)  # type: ignore[return-value]


def train_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    device: str,
    label_smoothing: float = 0.0,
    class_weights: torch.Tensor | None = None,
    precision: str = "fp32",
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[float, float]:
    """One pass over the training data; (mean loss, accuracy). Batches with parameters are augmented on device;
    class_weights: per-class loss weights or None."""
    weight = class_weights.to(device) if class_weights is not None else None
    criterion = nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)
    total_loss, correct, seen = 0.0, 0, 0
    for images, labels, *params in loader:
        inputs, targets = _to_input(images, device, params[0] if params else None), labels.to(device)
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device, precision):
            logits = model(inputs)
            loss = criterion(logits.float(), targets)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss.item()} (lower train.lr?)")
        _step(loss, optimizer, scaler)
        total_loss += float(loss.item()) * len(targets)
        correct += int((logits.argmax(dim=1) == targets).sum().item())
        seen += len(targets)
    return total_loss / max(seen, 1), correct / max(seen, 1)


def _step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> None:
    """Backward and optimizer step; with fp16 through the gradient scaler (which skips steps with inf gradients)."""
    if scaler is None:
        loss.backward()
        optimizer.step()
        return
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


def evaluate_loss(model: nn.Module, loader: DataLoader, device: str, precision: str = "fp32") -> tuple[float, float]:
    """(mean cross-entropy, accuracy) in eval mode without gradients."""
    criterion = nn.CrossEntropyLoss(reduction="sum")
    was_training = model.training
    model.eval()
    total_loss, correct, seen = 0.0, 0, 0
    with torch.inference_mode(), _autocast(device, precision):
        for images, labels in loader:
            inputs, targets = _to_input(images, device), labels.to(device)
            logits = model(inputs).float()
            total_loss += float(criterion(logits, targets).item())
            correct += int((logits.argmax(dim=1) == targets).sum().item())
            seen += len(targets)
    model.train(was_training)
    return total_loss / max(seen, 1), correct / max(seen, 1)
