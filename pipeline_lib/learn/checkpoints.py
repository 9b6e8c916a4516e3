"""Exact resume: the training state in last.pt (epochs done, early stopping, model, optimizer, lr schedule, loss
scale, RNG), the fingerprint that ties it to its settings and data, and the best epoch kept in best.pt."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from pipeline_lib.core import devices
from pipeline_lib.core.config import NormalizeConfig, TrainConfig
from pipeline_lib.core.workspace import atomic_path, digest_of
from pipeline_lib.learn.history import EpochStats
from pipeline_lib.learn.steps import TrainingRun

BEST_NAME = "best.pt"
LAST_NAME = "last.pt"
STATE_FORMAT = "aidetect-train-state-v1"
# Settings that do not change the result; a resumed run may differ in them.
_RUNTIME_KEYS = ("num_workers", "device", "compile", "precision", "augment_on")


@dataclass
class TrainState:
    """Everything needed to continue training after the last finished epoch."""

    fingerprint: str
    epoch: int = 0
    history: list[EpochStats] = field(default_factory=list)
    best_epoch: int = 0
    best_val_loss: float = math.inf
    bad_epochs: int = 0
    done: bool = False
    stopped_early: bool = False


def run_fingerprint(
    config: TrainConfig, train: pd.DataFrame, val: pd.DataFrame, policy: NormalizeConfig | None = None
) -> str:
    """Digest of the settings that shape the result and of the exact train/val images and labels."""
    settings = config.model_dump_json(exclude=set(_RUNTIME_KEYS))
    parts = [settings]
    if policy is not None and policy.mode != "none":
        parts.append(f"normalize:{policy.model_dump_json()}")  # unchanged digest without normalisation
    for name, frame in (("train", train), ("val", val)):
        parts.append(name)
        parts.extend((frame["sha256"].astype(str) + ":" + frame["label"].astype(str)).tolist())
    return digest_of(*parts)


def update_best(state: TrainState, stats: EpochStats, patience: int, may_stop: bool = True) -> bool:
    """Record the epoch for early stopping; True if it is the new best of the whole run (best.pt).

    1. best.pt keeps the lowest val loss of the run, whichever phase it came from.
    2. Early stopping counts the epochs since the best val loss of the current phase: at the phase change the
       counter and that best restart, so the all-layers phase gets `patience` epochs of its own.
    3. may_stop False (a head-only epoch with an all-layers phase to come) counts but never stops the run.
    """
    earlier = [e.val_loss for e in state.history if e.epoch < stats.epoch and e.phase == stats.phase]
    phase_best = min((loss for loss in earlier if not math.isnan(loss)), default=math.inf)
    if not earlier:
        state.bad_epochs = 0  # 2. the first epoch of a phase: the counter restarts
    state.bad_epochs = 0 if stats.val_loss < phase_best else state.bad_epochs + 1
    if may_stop and state.bad_epochs >= patience:
        state.stopped_early = True
    if stats.val_loss < state.best_val_loss:
        state.best_val_loss, state.best_epoch = stats.val_loss, stats.epoch
        return True
    return False


def state_payload(state: TrainState, run: TrainingRun) -> dict:
    """What last.pt holds after an epoch: the state, the model, optimizer, lr schedule and loss scale, the RNG."""
    model = run.model
    return {
        "format": STATE_FORMAT,
        "fingerprint": state.fingerprint,
        "epoch": state.epoch,
        "history": [dataclasses.asdict(epoch) for epoch in state.history],
        "best_epoch": state.best_epoch,
        "best_val_loss": state.best_val_loss,
        "bad_epochs": state.bad_epochs,
        "done": state.done,
        "stopped_early": state.stopped_early,
        "weights": {"name": run.weights.name, "sha256": run.weights.sha256},
        "model_name": model.name,
        "model": {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()},
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict() if run.scheduler is not None else None,
        "scaler": run.scaler.state_dict() if run.scaler is not None else None,
        "rng": _rng_state(run.device),
    }


def _rng_state(device: str) -> dict[str, torch.Tensor]:
    """The CPU generator's state, and the training GPU's on CUDA (what a resumed run continues from)."""
    state = {"torch": torch.get_rng_state()}
    if devices.is_cuda(device):
        state["cuda"] = torch.cuda.get_rng_state(torch.device(device))
    return state


def save_state(path: Path, payload: dict[str, Any]) -> None:
    """Write last.pt atomically (an interrupted write leaves the previous one)."""
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_state(path: Path, fingerprint: str) -> dict[str, Any] | None:
    """The payload of last.pt if present; errors name the file when it is damaged or from other inputs."""
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many types for bad files
        raise RuntimeError(f"training state {path} is corrupt ({error}); delete it to start training over") from None
    if not isinstance(payload, dict) or payload.get("format") != STATE_FORMAT:
        raise RuntimeError(f"{path} is not an aidetect training state; delete it or use another output folder")
    if payload["fingerprint"] != fingerprint:
        raise ValueError(
            f"{path} belongs to a training run with other settings or data; use another output folder or delete it"
        )
    return payload


def state_from(payload: dict[str, Any]) -> TrainState:
    """The TrainState a last.pt payload records."""
    return TrainState(
        fingerprint=payload["fingerprint"],
        epoch=int(payload["epoch"]),
        history=[EpochStats(**epoch) for epoch in payload["history"]],
        best_epoch=int(payload["best_epoch"]),
        best_val_loss=float(payload["best_val_loss"]),
        bad_epochs=int(payload["bad_epochs"]),
        done=bool(payload["done"]),
        stopped_early=bool(payload["stopped_early"]),
    )


def _cuda_index(device: str) -> int:
    index = torch.device(device).index
    return torch.cuda.current_device() if index is None else index


@contextlib.contextmanager
def restored_rng(payload: dict[str, Any] | None, device: str = "cpu") -> Iterator[None]:
    """Train inside forked RNGs (the caller's are untouched): the CPU's, and the GPU's on CUDA; restored from
    last.pt when resuming (a CUDA state saved by a GPU run is ignored when the run continues on another device)."""
    cuda = devices.is_cuda(device)
    with torch.random.fork_rng(devices=[_cuda_index(device)] if cuda else []):
        if payload is not None:
            rng = payload["rng"]
            torch.set_rng_state(rng["torch"])
            if cuda and "cuda" in rng:
                torch.cuda.set_rng_state(rng["cuda"], torch.device(device))
        yield
