"""Fine-tuning: head-only then all layers, seeded augmentation, early stopping and exact resume from last.pt."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from pipeline_lib import preprocess
from pipeline_lib.catalog import STATUS_OK
from pipeline_lib.config import LABELS, AugmentConfig, TrainConfig
from pipeline_lib.models import Classifier, WeightsInfo, build_model, save_checkpoint
from pipeline_lib.workspace import Workspace, atomic_path, digest_of

log = logging.getLogger(__name__)

BEST_NAME = "best.pt"
LAST_NAME = "last.pt"
STATE_FORMAT = "aidetect-train-state-v1"
# Settings that do not change the result; a resumed run may differ in them.
_RUNTIME_KEYS = ("num_workers", "device")


@dataclass
class EpochStats:
    """Numbers of one finished epoch (epoch counts from 1)."""

    epoch: int
    phase: str  # "head" | "all"
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    lr: float
    seconds: float


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


@dataclass
class _State:
    """Everything needed to continue training after the last finished epoch."""

    fingerprint: str
    epoch: int = 0
    history: list[EpochStats] = field(default_factory=list)
    best_epoch: int = 0
    best_val_loss: float = math.inf
    bad_epochs: int = 0
    done: bool = False
    stopped_early: bool = False


def resolve_device(device: str) -> str:
    """'auto' -> cuda if available else cpu; 'cuda' without a GPU is an error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is available (use train.device=auto or cpu)")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"train.device must be auto, cpu or cuda, got {device!r}")
    return device


def build_augmentation(config: AugmentConfig) -> v2.Compose:
    """The seed recipe on uint8 CHW tensors: rotation, h-flip, autocontrast, affine translate/scale."""
    if config.affine_scale_min > config.affine_scale_max:
        raise ValueError(
            f"train.augment.affine_scale_min ({config.affine_scale_min}) must be <= "
            f"affine_scale_max ({config.affine_scale_max})"
        )
    t = config.affine_translate
    return v2.Compose(
        [
            v2.RandomRotation(config.rotation_degrees),
            v2.RandomHorizontalFlip(config.hflip_p),
            v2.RandomAutocontrast(config.autocontrast_p),
            v2.RandomAffine(0, translate=(t, t), scale=(config.affine_scale_min, config.affine_scale_max)),
        ]
    )


class CachedImages(Dataset):
    """(uint8 CHW tensor, label index) per row from the tensor cache; optional augmentation seeded per sample."""

    def __init__(
        self,
        workspace: Workspace,
        shas: list[str],
        labels: list[int],
        size: int,
        augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
        seed: int = 0,
    ) -> None:
        self.workspace = workspace
        self.shas = shas
        self.labels = labels
        self.size = size
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.shas)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = torch.from_numpy(preprocess.load_tensor(self.workspace, self.shas[index], self.size))
        if self.augment is not None:
            # Seeded by (seed, epoch, index): the same crops whatever the worker count or a resume.
            sample_seed = int(np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0])
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed)
                image = self.augment(image)
        return image, self.labels[index]


def _rows(catalog: pd.DataFrame, split: str) -> pd.DataFrame:
    """Status-ok rows of one split, one per sha256, in a stable order."""
    rows = catalog[(catalog["status"] == STATUS_OK) & (catalog["split"] == split)].drop_duplicates("sha256")
    return rows.sort_values("sha256").reset_index(drop=True)


def _train_val(catalog: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The train and val rows; ValueError naming an empty split and the counts."""
    missing = [name for name in ("sha256", "label", "status", "split") if name not in catalog.columns]
    if missing:
        raise ValueError(f"catalog is missing columns: {', '.join(missing)}")
    train, val = _rows(catalog, "train"), _rows(catalog, "val")
    for name, rows in (("train", train), ("val", val)):
        if len(rows) == 0:
            raise ValueError(
                f"the {name} split is empty (train={len(train)}, val={len(val)} usable images); "
                "check split ratios (split.val > 0) and that enough images passed ingest"
            )
        bad = sorted(set(rows["label"]) - set(LABELS))
        if bad:
            raise ValueError(f"{name} rows have unknown labels {bad}; expected {LABELS}")
    return train, val


def _fingerprint(config: TrainConfig, train: pd.DataFrame, val: pd.DataFrame) -> str:
    """Digest of the settings that shape the result and of the exact train/val images and labels."""
    settings = config.model_dump_json(exclude=set(_RUNTIME_KEYS))
    parts = [settings]
    for name, frame in (("train", train), ("val", val)):
        parts.append(name)
        parts.extend((frame["sha256"].astype(str) + ":" + frame["label"].astype(str)).tolist())
    return digest_of(*parts)


def _dataset(workspace: Workspace, rows: pd.DataFrame, config: TrainConfig, augment: bool) -> CachedImages:
    labels = [LABELS.index(str(label)) for label in rows["label"]]
    transform = build_augmentation(config.augment) if augment else None
    return CachedImages(
        workspace, rows["sha256"].astype(str).tolist(), labels, config.image_size, transform, config.seed
    )


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, 7]).generate_state(1)[0])


def _loader(dataset: CachedImages, config: TrainConfig, shuffle: bool, epoch: int) -> DataLoader:
    """A DataLoader whose shuffling (and worker seeds) depend only on (seed, epoch)."""
    generator = torch.Generator().manual_seed(_epoch_seed(config.seed, epoch))
    return DataLoader(
        dataset,
        batch_size=config.batch_size,
        shuffle=shuffle,
        num_workers=config.num_workers,
        generator=generator,
        pin_memory=False,
    )


def _autocast(device: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on cuda; nothing on cpu (keeps CPU runs bitwise reproducible)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()


def _to_input(images: torch.Tensor, device: str) -> torch.Tensor:
    """uint8 batch -> float [0, 1] on device (channels_last on cuda)."""
    batch = images.to(device=device, non_blocking=True).float().div_(255.0)
    return batch.contiguous(memory_format=torch.channels_last) if device == "cuda" else batch


def _set_phase(model: Classifier, phase: str) -> None:
    """head: backbone frozen with BatchNorm in eval mode; all: everything trains."""
    train_backbone = phase == "all"
    for param in model.backbone_parameters():
        param.requires_grad_(train_backbone)
    model.train()
    if not train_backbone:
        model.backbone.eval()


def _make_optimizer(model: Classifier, config: TrainConfig) -> torch.optim.SGD:
    """SGD with the head at lr and the backbone at backbone_lr (or lr)."""
    groups = [
        {"params": model.head_parameters(), "lr": config.lr},
        {"params": model.backbone_parameters(), "lr": config.backbone_lr or config.lr},
    ]
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def _train_epoch(
    model: Classifier, loader: DataLoader, optimizer: torch.optim.Optimizer, device: str
) -> tuple[float, float]:
    """One pass over the training data; (mean loss, accuracy)."""
    criterion = nn.CrossEntropyLoss()
    total_loss, correct, seen = 0.0, 0, 0
    for images, labels in loader:
        inputs, targets = _to_input(images, device), labels.to(device)
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device):
            logits = model(inputs)
            loss = criterion(logits.float(), targets)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss.item()} (lower train.lr?)")
        loss.backward()
        optimizer.step()
        total_loss += float(loss.item()) * len(targets)
        correct += int((logits.argmax(dim=1) == targets).sum().item())
        seen += len(targets)
    return total_loss / max(seen, 1), correct / max(seen, 1)


def evaluate_loss(model: Classifier, loader: DataLoader, device: str) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) in eval mode without gradients."""
    criterion = nn.CrossEntropyLoss(reduction="sum")
    was_training = model.training
    model.eval()
    total_loss, correct, seen = 0.0, 0, 0
    with torch.inference_mode(), _autocast(device):
        for images, labels in loader:
            inputs, targets = _to_input(images, device), labels.to(device)
            logits = model(inputs).float()
            total_loss += float(criterion(logits, targets).item())
            correct += int((logits.argmax(dim=1) == targets).sum().item())
            seen += len(targets)
    model.train(was_training)
    return total_loss / max(seen, 1), correct / max(seen, 1)


def build_initial_model(config: TrainConfig) -> tuple[Classifier, WeightsInfo]:
    """The model training starts from: config.weights, random parts initialised from config.seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return build_model(config.model, config.weights)


def _state_payload(state: _State, model: Classifier, optimizer: torch.optim.Optimizer, weights: WeightsInfo) -> dict:
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
        "weights": {"name": weights.name, "sha256": weights.sha256},
        "model_name": model.name,
        "model": {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "rng": {"torch": torch.get_rng_state()},
    }


def _save_state(path: Path, payload: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _load_state(path: Path, fingerprint: str) -> dict[str, Any] | None:
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


def _state_from(payload: dict[str, Any]) -> _State:
    return _State(
        fingerprint=payload["fingerprint"],
        epoch=int(payload["epoch"]),
        history=[EpochStats(**epoch) for epoch in payload["history"]],
        best_epoch=int(payload["best_epoch"]),
        best_val_loss=float(payload["best_val_loss"]),
        bad_epochs=int(payload["bad_epochs"]),
        done=bool(payload["done"]),
        stopped_early=bool(payload["stopped_early"]),
    )


def _result(out_dir: Path, state: _State, weights: WeightsInfo, device: str, resumed: int | None) -> TrainResult:
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
    )


def _update_best(state: _State, stats: EpochStats, patience: int) -> bool:
    """Record the epoch for early stopping; True if it is the new best."""
    if stats.val_loss < state.best_val_loss:
        state.best_val_loss, state.best_epoch, state.bad_epochs = stats.val_loss, stats.epoch, 0
        return True
    state.bad_epochs += 1
    if state.bad_epochs >= patience:
        state.stopped_early = True
    return False


@contextlib.contextmanager
def _restored_rng(payload: dict[str, Any] | None) -> Iterator[None]:
    """Train inside a forked CPU RNG (the caller's is untouched), restored from last.pt when resuming."""
    with torch.random.fork_rng(devices=[]):
        if payload is not None:
            torch.set_rng_state(payload["rng"]["torch"])
        yield


def _prepare(
    config: TrainConfig, payload: dict[str, Any] | None, device: str
) -> tuple[Classifier, torch.optim.SGD, WeightsInfo]:
    """A fresh model from config.weights, or the model and optimizer of last.pt."""
    if payload is None:
        model, weights = build_initial_model(config)
    else:
        model, weights = build_model(config.model, "none")[0], WeightsInfo(**payload["weights"])
        model.load_state_dict(payload["model"], strict=True)
    model.to(device)
    if device == "cuda":
        model.to(memory_format=torch.channels_last)
    optimizer = _make_optimizer(model, config)
    if payload is not None:
        optimizer.load_state_dict(payload["optimizer"])
    return model, optimizer, weights


def train_model(
    workspace: Workspace,
    catalog: pd.DataFrame,
    config: TrainConfig,
    out_dir: Path,
    on_epoch: Callable[[EpochStats], None] | None = None,
    stop_after_epoch: int | None = None,
) -> TrainResult:
    """Fine-tune on the train split, early-stop on val loss; resume from out_dir/last.pt if present."""
    train_rows, val_rows = _train_val(catalog)
    device = resolve_device(config.device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = _fingerprint(config, train_rows, val_rows)
    payload = _load_state(out_dir / LAST_NAME, fingerprint)
    state = _state_from(payload) if payload is not None else _State(fingerprint)
    resumed = state.epoch if payload is not None else None
    if state.done:
        log.info("training in %s already finished at epoch %d (best %d)", out_dir, state.epoch, state.best_epoch)
        return _result(out_dir, state, WeightsInfo(**payload["weights"]), device, resumed)
    preprocess.preprocess_images(workspace, pd.concat([train_rows, val_rows]), config.image_size)
    train_set = _dataset(workspace, train_rows, config, augment=True)
    val_set = _dataset(workspace, val_rows, config, augment=False)
    with _restored_rng(payload):
        model, optimizer, weights = _prepare(config, payload, device)
        if resumed is not None:
            log.info("resuming training in %s after epoch %d", out_dir, resumed)
        while state.epoch < config.epochs and not state.done:
            stats = _run_epoch(model, optimizer, train_set, val_set, config, state.epoch + 1, device)
            _finish_epoch(out_dir, state, stats, model, optimizer, weights, config)
            if on_epoch is not None:
                on_epoch(stats)
            if stop_after_epoch is not None and state.epoch >= stop_after_epoch and not state.done:
                log.info("stopping after epoch %d as asked (resume by calling again)", state.epoch)
                break
    return _result(out_dir, state, weights, device, resumed)


def _run_epoch(
    model: Classifier,
    optimizer: torch.optim.SGD,
    train_set: CachedImages,
    val_set: CachedImages,
    config: TrainConfig,
    epoch: int,
    device: str,
) -> EpochStats:
    """Train one epoch (head-only while epoch <= head_only_epochs) and validate."""
    started = time.perf_counter()
    phase = "head" if epoch <= config.head_only_epochs else "all"
    torch.manual_seed(_epoch_seed(config.seed, epoch))  # dropout etc. depend on (seed, epoch) only
    train_set.epoch = epoch
    _set_phase(model, phase)
    train_loss, train_accuracy = _train_epoch(model, _loader(train_set, config, True, epoch), optimizer, device)
    val_loss, val_accuracy = evaluate_loss(model, _loader(val_set, config, False, epoch), device)
    return EpochStats(
        epoch=epoch,
        phase=phase,
        train_loss=train_loss,
        train_accuracy=train_accuracy,
        val_loss=val_loss,
        val_accuracy=val_accuracy,
        lr=float(optimizer.param_groups[0]["lr"]),
        seconds=time.perf_counter() - started,
    )


def _finish_epoch(
    out_dir: Path,
    state: _State,
    stats: EpochStats,
    model: Classifier,
    optimizer: torch.optim.SGD,
    weights: WeightsInfo,
    config: TrainConfig,
) -> None:
    """Update early stopping, write best.pt if improved, then last.pt (always, last)."""
    state.epoch = stats.epoch
    state.history.append(stats)
    improved = _update_best(state, stats, config.patience)
    state.done = state.stopped_early or state.epoch >= config.epochs
    log.info(
        "epoch %d/%d [%s] train loss %.4f acc %.3f | val loss %.4f acc %.3f | %.1fs%s",
        stats.epoch,
        config.epochs,
        stats.phase,
        stats.train_loss,
        stats.train_accuracy,
        stats.val_loss,
        stats.val_accuracy,
        stats.seconds,
        " (best)" if improved else "",
    )
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
        log.info("early stopping after epoch %d: no val loss improvement for %d epochs", state.epoch, state.bad_epochs)
    _save_state(out_dir / LAST_NAME, _state_payload(state, model, optimizer, weights))
