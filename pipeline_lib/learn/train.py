"""Fine-tuning: head-only then all layers, augmentation, lr schedule, early stopping, exact resume (last.pt).

The loop; the data (datasets), the passes (steps), the training state (checkpoints) and the epochs' history
(history) have modules of their own.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch.utils.data import DataLoader

from pipeline_lib.core import devices
from pipeline_lib.core.config import LABELS, NormalizeConfig, TrainConfig
from pipeline_lib.core.workspace import Workspace
from pipeline_lib.learn import foundation, preprocess
from pipeline_lib.learn.augment import resolve_augment_on
from pipeline_lib.learn.checkpoints import (
    BEST_NAME,
    LAST_NAME,
    TrainState,
    load_state,
    restored_rng,
    run_fingerprint,
    save_state,
    state_from,
    state_payload,
    update_best,
)
from pipeline_lib.learn.datasets import (
    ClassBalance,
    class_balance,
    closing_loaders,
    epoch_seed,
    loss_weights,
    make_dataset,
    make_loader,
    train_val_rows,
)
from pipeline_lib.learn.history import EpochStats
from pipeline_lib.learn.models import Classifier, WeightsInfo, build_model, save_checkpoint
from pipeline_lib.learn.steps import (
    TrainingRun,
    compiled,
    evaluate_loss,
    make_optimizer,
    make_scheduler,
    set_phase,
    train_epoch,
)

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """Where the models are and how training went."""

    best_path: Path
    last_path: Path
    best_epoch: int
    best_val_loss: float
    history: list[EpochStats]
    stopped_early: bool
    weights: WeightsInfo
    device: str
    resumed_from_epoch: int | None = None
    balance: dict[str, float] = field(default_factory=dict)  # ClassBalance.metrics() of the training split
    precision: str = "fp32"  # bf16 | fp16 | fp32, what the run trained with
    augment_on: str = "loader"  # loader | device, where the training images were augmented (none: probe)
    mode: str = "finetune"  # finetune | probe (train.mode resolved)
    features: dict[str, float] = field(default_factory=dict)  # probe: feature vectors computed now / reused


def resolve_device(device: str) -> str:
    """auto -> cuda, else mps, else cpu; cpu, cuda, cuda:N and mps as given when available, else RuntimeError."""
    return devices.resolve_device(device)


def build_initial_model(config: TrainConfig) -> tuple[Classifier, WeightsInfo]:
    """The model training starts from: config.weights, random parts initialised from config.seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return build_model(config.model, config.weights, config.weights_url)


def _prepare(config: TrainConfig, payload: dict[str, Any] | None, device: str, precision: str = "fp32") -> TrainingRun:
    """A fresh model from config.weights, or the model, optimizer and scheduler of last.pt."""
    if payload is None:
        model, weights = build_initial_model(config)
    else:
        model, weights = build_model(config.model, "none")[0], WeightsInfo(**payload["weights"])
        model.load_state_dict(payload["model"], strict=True)
    model.to(device)
    if devices.is_cuda(device):
        model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, config)
    scheduler = make_scheduler(optimizer, config)
    scaler = devices.grad_scaler(device, precision)
    if payload is not None:
        optimizer.load_state_dict(payload["optimizer"])
        if scheduler is not None:
            if payload.get("scheduler") is None:
                raise RuntimeError("the training state lacks the lr scheduler state; delete last.pt to start over")
            scheduler.load_state_dict(payload["scheduler"])
        if scaler is not None and payload.get("scaler"):
            scaler.load_state_dict(payload["scaler"])  # an fp16 run continues with its loss scale
    forward = compiled(model, config, device)
    return TrainingRun(model, forward, optimizer, scheduler, weights, device, precision, scaler)


def train_model(
    workspace: Workspace,
    catalog: pd.DataFrame,
    config: TrainConfig,
    out_dir: Path,
    on_epoch: Callable[[EpochStats], None] | None = None,
    stop_after_epoch: int | None = None,
    policy: NormalizeConfig | None = None,
    resume: bool = True,
) -> TrainResult:
    """Train the classifier as config.mode says: probe (learn/probe.py: a head on cached features of the frozen
    backbone) or finetune (here: head first, then all layers), early-stopped on val loss; a fine-tuning run resumes
    from out_dir/last.pt if present.

    policy: preprocess.normalize, the re-encoding the tensors are decoded with (None: the files as they are).
    resume: False starts from epoch 0 even when out_dir holds a training state (its files are overwritten).
    """
    if config.resolved_mode == "probe":
        from pipeline_lib.learn.probe import train_probe  # probe.py imports this module (TrainResult)

        return train_probe(workspace, catalog, config, out_dir, on_epoch=on_epoch, policy=policy)
    foundation.check_input_size(config.model, config.image_size)
    train_rows, val_rows = train_val_rows(catalog)
    device = resolve_device(config.device)
    precision = devices.resolve_precision(config.precision, device)
    augment_on = resolve_augment_on(config.augment_on, device, config.augment)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = run_fingerprint(config, train_rows, val_rows, policy)
    if not resume:
        for name in (LAST_NAME, BEST_NAME):  # an earlier run's best.pt must not outlive a fresh start
            (out_dir / name).unlink(missing_ok=True)
    payload = load_state(out_dir / LAST_NAME, fingerprint)
    state = state_from(payload) if payload is not None else TrainState(fingerprint)
    resumed = state.epoch if payload is not None else None
    balance = class_balance([LABELS.index(str(label)) for label in train_rows["label"]], config.class_balance)
    if state.done:
        log.info("training in %s already finished at epoch %d (best %d)", out_dir, state.epoch, state.best_epoch)
        finished = _result(out_dir, state, WeightsInfo(**payload["weights"]), device, resumed, balance)
        return dataclasses.replace(finished, precision=precision, augment_on=augment_on)
    _log_balance(balance)
    preprocess.preprocess_images(workspace, pd.concat([train_rows, val_rows]), config.image_size, policy=policy)
    on_device = augment_on == "device"
    train_set = make_dataset(workspace, train_rows, config, augment=True, policy=policy, on_device=on_device)
    val_set = make_dataset(workspace, val_rows, config, augment=False, policy=policy)
    undersample = config.class_balance == "undersample"
    loaders = (
        make_loader(train_set, config, True, device, undersample=undersample),
        make_loader(val_set, config, False, device),
    )
    with restored_rng(payload, device), closing_loaders(loaders):
        run = _prepare(config, payload, device, precision)
        weights = run.weights
        log.info("training on %s in %s, augmenting on the %s", device, precision, augment_on)
        if resumed is not None:
            log.info("resuming training in %s after epoch %d", out_dir, resumed)
        while state.epoch < config.epochs and not state.done:
            stats = _run_epoch(run, loaders, config, state.epoch + 1, device)
            if run.scheduler is not None:
                run.scheduler.step()  # per epoch; stats.lr is the lr the epoch trained with
            _finish_epoch(out_dir, state, stats, run, config)
            if on_epoch is not None:
                on_epoch(stats)
            if stop_after_epoch is not None and state.epoch >= stop_after_epoch and not state.done:
                log.info("stopping after epoch %d as asked (resume by calling again)", state.epoch)
                break
    return dataclasses.replace(
        _result(out_dir, state, weights, device, resumed, balance), precision=precision, augment_on=augment_on
    )


def _log_balance(balance: ClassBalance) -> None:
    """One log line: the class counts of the training split and what train.class_balance does with them."""
    counts = " ".join(f"{label}={n}" for label, n in balance.counts.items())
    weights = " ".join(f"{label}={w:.3g}" for label, w in balance.weights.items())
    log.info(
        "class balance %s: train %s, loss weights %s, %d images per epoch (validation loss unweighted)",
        balance.mode,
        counts,
        weights,
        balance.per_epoch,
    )


def _run_epoch(
    run: TrainingRun, loaders: tuple[DataLoader, DataLoader], config: TrainConfig, epoch: int, device: str
) -> EpochStats:
    """Train one epoch (head-only while epoch <= head_only_epochs) and validate."""
    started = time.perf_counter()
    phase = "head" if epoch <= config.head_only_epochs else "all"
    torch.manual_seed(epoch_seed(config.seed, epoch))  # dropout etc. depend on (seed, epoch) only
    train_loader, val_loader = loaders
    for loader in loaders:
        loader.sampler.set_epoch(epoch)
        loader.dataset.epoch = epoch
    lr = float(run.optimizer.param_groups[0]["lr"])
    set_phase(run.model, phase)
    weights = loss_weights(class_balance(train_loader.dataset.labels, config.class_balance))
    train_loss, train_accuracy = train_epoch(
        run.forward, train_loader, run.optimizer, device, config.label_smoothing, weights, run.precision, run.scaler
    )
    train_seconds = time.perf_counter() - started
    val_loss, val_accuracy = evaluate_loss(run.forward, val_loader, device, run.precision)
    return EpochStats(
        epoch=epoch,
        phase=phase,
        train_loss=train_loss,
        train_accuracy=train_accuracy,
        val_loss=val_loss,
        val_accuracy=val_accuracy,
        lr=lr,
        seconds=time.perf_counter() - started,
        images_per_second=len(train_loader.sampler) / max(train_seconds, 1e-9),
    )


def _finish_epoch(
    out_dir: Path,
    state: TrainState,
    stats: EpochStats,
    run: TrainingRun,
    config: TrainConfig,
) -> None:
    """Update early stopping, write best.pt if improved, then last.pt (always, last)."""
    state.epoch = stats.epoch
    state.history.append(stats)
    # Only the all-layers phase may stop the run early, unless the run is head-only throughout.
    may_stop = stats.phase == "all" or config.head_only_epochs >= config.epochs
    improved = update_best(state, stats, config.patience, may_stop)
    state.done = state.stopped_early or state.epoch >= config.epochs
    log.info(
        "epoch %d/%d [%s] lr %.3g train loss %.4f acc %.3f | val loss %.4f acc %.3f | %.1fs, %.1f img/s%s",
        stats.epoch,
        config.epochs,
        stats.phase,
        stats.lr,
        stats.train_loss,
        stats.train_accuracy,
        stats.val_loss,
        stats.val_accuracy,
        stats.seconds,
        stats.images_per_second,
        " (best)" if improved else "",
    )
    model, weights = run.model, run.weights
    if improved:
        meta = {
            "model_name": model.name,
            "image_size": config.image_size,
            "weights_name": weights.name,
            "weights_sha256": weights.sha256,
            "epoch": stats.epoch,
            "val_loss": stats.val_loss,
            "val_accuracy": stats.val_accuracy,
            "seed": config.seed,
        }
        save_checkpoint(out_dir / BEST_NAME, model, meta)
    if state.stopped_early:
        log.info(
            "early stopping after epoch %d: no val loss improvement in the %s phase for %d epochs",
            state.epoch,
            stats.phase,
            state.bad_epochs,
        )
    save_state(out_dir / LAST_NAME, state_payload(state, run))


def _result(
    out_dir: Path, state: TrainState, weights: WeightsInfo, device: str, resumed: int | None, balance: ClassBalance
) -> TrainResult:
    best = out_dir / BEST_NAME
    if not best.is_file():
        raise FileNotFoundError(f"best model {best} is missing although {out_dir / LAST_NAME} exists; delete both")
    return TrainResult(
        best_path=best,
        last_path=out_dir / LAST_NAME,
        best_epoch=state.best_epoch,
        best_val_loss=state.best_val_loss,
        history=list(state.history),
        stopped_early=state.stopped_early,
        weights=weights,
        device=device,
        resumed_from_epoch=resumed,
        balance=balance.metrics(),
    )
