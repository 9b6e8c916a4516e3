"""Fine-tuning: head-only then all layers, augmentation, lr schedule, early stopping, exact resume (last.pt)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR, LRScheduler, StepLR
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import v2

from pipeline_lib.core import devices
from pipeline_lib.core.catalog import STATUS_OK
from pipeline_lib.core.config import LABELS, AugmentConfig, NormalizeConfig, TrainConfig
from pipeline_lib.core.workspace import Workspace, atomic_path, digest_of
from pipeline_lib.learn import augment as augment_lib
from pipeline_lib.learn import preprocess
from pipeline_lib.learn.models import Classifier, WeightsInfo, build_model, save_checkpoint

log = logging.getLogger(__name__)

BEST_NAME = "best.pt"
LAST_NAME = "last.pt"
STATE_FORMAT = "aidetect-train-state-v1"
# Settings that do not change the result; a resumed run may differ in them.
_RUNTIME_KEYS = ("num_workers", "device", "compile", "precision", "augment_on")
_BLUR_KERNELS = (3, 5)
_BLUR_SIGMA = (0.1, 1.5)


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
    images_per_second: float = 0.0  # training images / seconds of the training pass (validation not counted)


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
    augment_on: str = "loader"  # loader | device, where the training images were augmented


@dataclass(frozen=True)
class ClassBalance:
    """How training treats the classes (train.class_balance): images per class, loss weights, images per epoch."""

    mode: str
    counts: dict[str, int]
    weights: dict[str, float]
    per_epoch: int

    def metrics(self) -> dict[str, float]:
        """Flat numbers for MLflow: <label>.images, <label>.weight, images_per_epoch."""
        flat = {f"{label}.images": float(n) for label, n in self.counts.items()}
        flat |= {f"{label}.weight": weight for label, weight in self.weights.items()}
        return flat | {"images_per_epoch": float(self.per_epoch)}


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


@dataclass
class _Run:
    """The live objects of one training run."""

    model: Classifier
    forward: nn.Module  # model, or its torch.compile wrapper (same parameters)
    optimizer: torch.optim.SGD
    scheduler: LRScheduler | None
    weights: WeightsInfo
    device: str = "cpu"
    precision: str = "fp32"
    scaler: torch.amp.GradScaler | None = None  # fp16 only


def resolve_device(device: str) -> str:
    """auto -> cuda, else mps, else cpu; cpu, cuda, cuda:N and mps as given when available, else RuntimeError."""
    return devices.resolve_device(device)


def _is_cuda(device: str) -> bool:
    return devices.device_type(device) == "cuda"


def resolve_augment_on(augment_on: str, device: str, config: AugmentConfig) -> str:
    """'device' or 'loader': auto augments on a CUDA device, in the loader elsewhere (or where JPEG cannot run)."""
    if augment_on not in ("auto", "loader", "device"):
        raise ValueError(f"train.augment_on must be auto, loader or device, got {augment_on!r}")
    if augment_on != "auto":
        return augment_on
    if not _is_cuda(device):
        return "loader"
    return "device" if config.jpeg_p == 0 or augment_lib.jpeg_works_on(device) else "loader"


def build_augmentation(config: AugmentConfig) -> v2.Compose:
    """On uint8 CHW tensors: rotation+translate+scale (one affine), h-flip, autocontrast, optional blur and JPEG."""
    if config.affine_scale_min > config.affine_scale_max:
        raise ValueError(
            f"train.augment.affine_scale_min ({config.affine_scale_min}) must be <= "
            f"affine_scale_max ({config.affine_scale_max})"
        )
    if config.jpeg_quality_min > config.jpeg_quality_max:
        raise ValueError(
            f"train.augment.jpeg_quality_min ({config.jpeg_quality_min}) must be <= "
            f"jpeg_quality_max ({config.jpeg_quality_max})"
        )
    t = config.affine_translate
    # The recipe's RandomRotation and RandomAffine as one warp: the same mapping of pixels as a rotation followed
    # by a translate/scale (uniform scaling commutes with rotation), one interpolation instead of two, and half the
    # per-sample cost. One difference: where the shift or a zoom-out shows what the separate rotation had cut off
    # at the frame, the single warp shows those pixels instead of black. The flip after the warp gives the same
    # distribution (the translation range is symmetric).
    steps: list[nn.Module] = [
        v2.RandomAffine(
            config.rotation_degrees, translate=(t, t), scale=(config.affine_scale_min, config.affine_scale_max)
        ),
        v2.RandomHorizontalFlip(config.hflip_p),
        v2.RandomAutocontrast(config.autocontrast_p),
    ]
    # Degradations real photos go through; only added when enabled so p=0 leaves the random stream unchanged.
    if config.blur_p > 0:
        blurs = [v2.GaussianBlur(kernel, sigma=_BLUR_SIGMA) for kernel in _BLUR_KERNELS]
        steps.append(v2.RandomApply([v2.RandomChoice(blurs)], p=config.blur_p))
    if config.jpeg_p > 0:
        jpeg = v2.JPEG(quality=(config.jpeg_quality_min, config.jpeg_quality_max))
        steps.append(v2.RandomApply([jpeg], p=config.jpeg_p))
    return v2.Compose(steps)


class CachedImages(Dataset):
    """(uint8 CHW tensor, label index) per row from the tensor cache; optional augmentation seeded per sample.

    With draw instead of augment, the item is (image as stored, label index, the sample's augmentation parameters):
    the batch is augmented later on the training device (augment.apply_params).
    """

    def __init__(
        self,
        workspace: Workspace,
        shas: list[str],
        labels: list[int],
        size: int,
        augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
        seed: int = 0,
        policy: NormalizeConfig | None = None,
        draw: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if augment is not None and draw is not None:
            raise ValueError("CachedImages takes augment (in the loader) or draw (on the device), not both")
        self.workspace = workspace
        self.draw = draw
        self.policy = policy
        self.shas = shas
        self.labels = labels
        self.size = size
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.shas)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, ...]:
        """key: an index (uses self.epoch) or (epoch, index) as EpochSampler yields (works in persistent workers)."""
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        image = torch.from_numpy(preprocess.load_tensor(self.workspace, self.shas[index], self.size, self.policy))
        if self.draw is not None:
            return image, self.labels[index], self._seeded(epoch, index, self.draw, image)
        if self.augment is not None:
            image = self._seeded(epoch, index, self.augment, image)
        return image, self.labels[index]

    def _seeded(
        self, epoch: int, index: int, function: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor
    ) -> torch.Tensor:
        """function(image) with the CPU generator seeded by (seed, epoch, index): the same augmentation whatever
        the worker count, a resume, or whether the loader or the device applies it."""
        sample_seed = int(np.random.SeedSequence([self.seed, epoch, index]).generate_state(1)[0])
        with torch.random.fork_rng(devices=[]):
            # The CPU generator only: in a CUDA build torch.manual_seed also queues a CUDA seeding that
            # formats a stack trace, 0.18 ms per call against 0.002 ms (H100 machine, torch 2.11).
            torch.default_generator.manual_seed(sample_seed)
            return function(image)


class ParamDraw:
    """Draws one sample's augmentation parameters in a loader worker (picklable for spawned workers)."""

    def __init__(self, config: AugmentConfig) -> None:
        build_augmentation(config)  # the same checks as the loader path
        self.config = config

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return augment_lib.draw_params(self.config, int(image.shape[-2]), int(image.shape[-1]))


def class_balance(labels: Sequence[int], mode: str) -> ClassBalance:
    """Per-class counts of label indices (LABELS order) and what train.class_balance makes of them.

    weighted: each class's loss weight is n / (classes * n_class) (inverse frequency, mean weight 1), so a 4:1 split
    weighs every minority image four times as much; none and undersample keep weight 1. undersample draws as many
    images of each class per epoch as the smallest class has.
    """
    if mode not in ("none", "weighted", "undersample"):
        raise ValueError(f"train.class_balance must be none, weighted or undersample, got {mode!r}")
    counts = {label: sum(1 for value in labels if value == index) for index, label in enumerate(LABELS)}
    present = [n for n in counts.values() if n > 0]
    weights = dict.fromkeys(LABELS, 1.0)
    if mode == "weighted" and len(present) > 1:
        weights = {label: (len(labels) / (len(present) * n) if n else 1.0) for label, n in counts.items()}
    per_epoch = len(present) * min(present) if mode == "undersample" and len(present) > 1 else len(labels)
    return ClassBalance(mode, counts, weights, per_epoch)


def _loss_weights(balance: ClassBalance) -> torch.Tensor | None:
    """The CrossEntropyLoss class weights (LABELS order), or None when every weight is 1."""
    values = [balance.weights[label] for label in LABELS]
    return None if all(value == 1.0 for value in values) else torch.tensor(values, dtype=torch.float32)


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


def _fingerprint(
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


def _dataset(
    workspace: Workspace,
    rows: pd.DataFrame,
    config: TrainConfig,
    augment: bool,
    policy: NormalizeConfig | None,
    on_device: bool = False,
) -> CachedImages:
    """The dataset of rows; augment=True augments in the loader, or with on_device only draws the parameters."""
    labels = [LABELS.index(str(label)) for label in rows["label"]]
    transform = build_augmentation(config.augment) if augment and not on_device else None
    draw = ParamDraw(config.augment) if augment and on_device else None
    shas = rows["sha256"].astype(str).tolist()
    return CachedImages(workspace, shas, labels, config.image_size, transform, config.seed, policy, draw=draw)


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, 7]).generate_state(1)[0])


class EpochSampler(Sampler[tuple[int, int]]):
    """Yields (epoch, index) keys, shuffled by (seed, epoch): workers learn the epoch from the key itself."""

    def __init__(self, size: int, seed: int, shuffle: bool) -> None:
        self.size = size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next iteration belongs to."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch))
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        return iter([(self.epoch, index) for index in order])


class UndersampledEpochSampler(EpochSampler):
    """EpochSampler over a class-balanced subset: per epoch, as many images of each class as the smallest class has,
    drawn at random by (seed, epoch) (all of the smallest class), then shuffled."""

    def __init__(self, labels: Sequence[int], seed: int) -> None:
        super().__init__(len(labels), seed, shuffle=True)
        members = [[i for i, label in enumerate(labels) if label == value] for value in sorted(set(labels))]
        self.members = [torch.tensor(indices, dtype=torch.int64) for indices in members]
        self.per_class = min((len(indices) for indices in members), default=0)

    def __len__(self) -> int:
        return self.per_class * len(self.members)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch))
        drawn = [group[torch.randperm(len(group), generator=generator)[: self.per_class]] for group in self.members]
        chosen = torch.cat(drawn) if drawn else torch.empty(0, dtype=torch.int64)
        order = chosen[torch.randperm(len(chosen), generator=generator)].tolist()
        return iter([(self.epoch, index) for index in order])


def make_loader(
    dataset: CachedImages, config: TrainConfig, shuffle: bool, device: str, undersample: bool = False
) -> DataLoader:
    """A DataLoader for the whole run (call loader.sampler.set_epoch each epoch); pinned on cuda, workers kept.

    undersample: draw a class-balanced subset each epoch (UndersampledEpochSampler; implies shuffling).
    """
    workers = devices.resolve_num_workers(config.num_workers, device)
    if undersample:
        sampler: EpochSampler = UndersampledEpochSampler(dataset.labels, config.seed)
    else:
        sampler = EpochSampler(len(dataset), config.seed, shuffle)
    return DataLoader(
        dataset,
        batch_size=config.batch_size,
        sampler=sampler,
        num_workers=workers,
        generator=torch.Generator().manual_seed(config.seed),  # worker base seeds
        pin_memory=_is_cuda(device),
        persistent_workers=workers > 0,
    )


def _autocast(device: str, precision: str) -> contextlib.AbstractContextManager:
    """Autocast to bf16 or fp16 on device; nothing for fp32 (keeps CPU runs bitwise reproducible)."""
    return devices.autocast(device, precision)


def _to_input(images: torch.Tensor, device: str, params: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 batch -> float [0, 1] on device (channels_last on cuda), augmented there first when params are given."""
    batch = images.to(device=device, non_blocking=True)
    if params is not None:
        batch = augment_lib.apply_params(batch, params)
    batch = batch.float().div_(255.0)
    return batch.contiguous(memory_format=torch.channels_last) if _is_cuda(device) else batch


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


@contextlib.contextmanager
def _closing(loaders: tuple[DataLoader, ...]) -> Iterator[tuple[DataLoader, ...]]:
    """Stop the loaders' persistent worker processes on the way out, also when training fails."""
    try:
        yield loaders
    finally:
        for loader in loaders:
            iterator, loader._iterator = loader._iterator, None
            shutdown = getattr(iterator, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()


def _make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> LRScheduler | None:
    """Per-epoch schedule over the whole run (both param groups), or None for a constant lr."""
    if config.schedule == "cosine":
        return CosineAnnealingLR(optimizer, T_max=config.epochs)
    if config.schedule == "step":
        return StepLR(optimizer, step_size=config.step_size, gamma=config.gamma)
    return None


def _compiled(model: Classifier, config: TrainConfig, device: str) -> nn.Module:
    """torch.compile(model) when asked and on cuda; the model itself otherwise."""
    if not config.compile:
        return model
    if not _is_cuda(device):
        log.info("train.compile ignored on %s: torch.compile is only used on CUDA", device)
        return model
    log.info("compiling the model with torch.compile (the first steps are slow)")
    return torch.compile(model)  # type: ignore[return-value]


def _train_epoch(
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


def build_initial_model(config: TrainConfig) -> tuple[Classifier, WeightsInfo]:
    """The model training starts from: config.weights, random parts initialised from config.seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return build_model(config.model, config.weights, config.weights_url)


def _state_payload(state: _State, run: _Run) -> dict:
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
    if _is_cuda(device):
        state["cuda"] = torch.cuda.get_rng_state(torch.device(device))
    return state


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


def _result(
    out_dir: Path, state: _State, weights: WeightsInfo, device: str, resumed: int | None, balance: ClassBalance
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


def _update_best(state: _State, stats: EpochStats, patience: int, may_stop: bool = True) -> bool:
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


def _cuda_index(device: str) -> int:
    index = torch.device(device).index
    return torch.cuda.current_device() if index is None else index


@contextlib.contextmanager
def _restored_rng(payload: dict[str, Any] | None, device: str = "cpu") -> Iterator[None]:
    """Train inside forked RNGs (the caller's are untouched): the CPU's, and the GPU's on CUDA; restored from
    last.pt when resuming (a CUDA state saved by a GPU run is ignored when the run continues on another device)."""
    cuda = _is_cuda(device)
    with torch.random.fork_rng(devices=[_cuda_index(device)] if cuda else []):
        if payload is not None:
            rng = payload["rng"]
            torch.set_rng_state(rng["torch"])
            if cuda and "cuda" in rng:
                torch.cuda.set_rng_state(rng["cuda"], torch.device(device))
        yield


def _prepare(config: TrainConfig, payload: dict[str, Any] | None, device: str, precision: str = "fp32") -> _Run:
    """A fresh model from config.weights, or the model, optimizer and scheduler of last.pt."""
    if payload is None:
        model, weights = build_initial_model(config)
    else:
        model, weights = build_model(config.model, "none")[0], WeightsInfo(**payload["weights"])
        model.load_state_dict(payload["model"], strict=True)
    model.to(device)
    if _is_cuda(device):
        model.to(memory_format=torch.channels_last)
    optimizer = _make_optimizer(model, config)
    scheduler = _make_scheduler(optimizer, config)
    scaler = devices.grad_scaler(device, precision)
    if payload is not None:
        optimizer.load_state_dict(payload["optimizer"])
        if scheduler is not None:
            if payload.get("scheduler") is None:
                raise RuntimeError("the training state lacks the lr scheduler state; delete last.pt to start over")
            scheduler.load_state_dict(payload["scheduler"])
        if scaler is not None and payload.get("scaler"):
            scaler.load_state_dict(payload["scaler"])  # an fp16 run continues with its loss scale
    forward = _compiled(model, config, device)
    return _Run(model, forward, optimizer, scheduler, weights, device, precision, scaler)


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
    """Fine-tune on the train split, early-stop on val loss; resume from out_dir/last.pt if present.

    policy: preprocess.normalize, the re-encoding the tensors are decoded with (None: the files as they are).
    resume: False starts from epoch 0 even when out_dir holds a training state (its files are overwritten).
    """
    train_rows, val_rows = _train_val(catalog)
    device = resolve_device(config.device)
    precision = devices.resolve_precision(config.precision, device)
    augment_on = resolve_augment_on(config.augment_on, device, config.augment)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = _fingerprint(config, train_rows, val_rows, policy)
    if not resume:
        for name in (LAST_NAME, BEST_NAME):  # an earlier run's best.pt must not outlive a fresh start
            (out_dir / name).unlink(missing_ok=True)
    payload = _load_state(out_dir / LAST_NAME, fingerprint)
    state = _state_from(payload) if payload is not None else _State(fingerprint)
    resumed = state.epoch if payload is not None else None
    balance = class_balance([LABELS.index(str(label)) for label in train_rows["label"]], config.class_balance)
    if state.done:
        log.info("training in %s already finished at epoch %d (best %d)", out_dir, state.epoch, state.best_epoch)
        finished = _result(out_dir, state, WeightsInfo(**payload["weights"]), device, resumed, balance)
        return dataclasses.replace(finished, precision=precision, augment_on=augment_on)
    _log_balance(balance)
    preprocess.preprocess_images(workspace, pd.concat([train_rows, val_rows]), config.image_size, policy=policy)
    on_device = augment_on == "device"
    train_set = _dataset(workspace, train_rows, config, augment=True, policy=policy, on_device=on_device)
    val_set = _dataset(workspace, val_rows, config, augment=False, policy=policy)
    undersample = config.class_balance == "undersample"
    loaders = (
        make_loader(train_set, config, True, device, undersample=undersample),
        make_loader(val_set, config, False, device),
    )
    with _restored_rng(payload, device), _closing(loaders):
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
    run: _Run, loaders: tuple[DataLoader, DataLoader], config: TrainConfig, epoch: int, device: str
) -> EpochStats:
    """Train one epoch (head-only while epoch <= head_only_epochs) and validate."""
    started = time.perf_counter()
    phase = "head" if epoch <= config.head_only_epochs else "all"
    torch.manual_seed(_epoch_seed(config.seed, epoch))  # dropout etc. depend on (seed, epoch) only
    train_loader, val_loader = loaders
    for loader in loaders:
        loader.sampler.set_epoch(epoch)
        loader.dataset.epoch = epoch
    lr = float(run.optimizer.param_groups[0]["lr"])
    _set_phase(run.model, phase)
    weights = _loss_weights(class_balance(train_loader.dataset.labels, config.class_balance))
    train_loss, train_accuracy = _train_epoch(
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
    state: _State,
    stats: EpochStats,
    run: _Run,
    config: TrainConfig,
) -> None:
    """Update early stopping, write best.pt if improved, then last.pt (always, last)."""
    state.epoch = stats.epoch
    state.history.append(stats)
    # Only the all-layers phase may stop the run early, unless the run is head-only throughout.
    may_stop = stats.phase == "all" or config.head_only_epochs >= config.epochs
    improved = _update_best(state, stats, config.patience, may_stop)
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
    _save_state(out_dir / LAST_NAME, _state_payload(state, run))


def seconds_left(durations: Sequence[float], epoch: int, max_epochs: int) -> float:
    """Seconds the remaining epochs would take at the mean pace of durations (an upper bound: early stopping)."""
    if not durations:
        return math.nan
    return max(0, max_epochs - epoch) * (sum(durations) / len(durations))


def describe_epoch(stats: EpochStats, max_epochs: int, left_s: float) -> str:
    """One console line per epoch: phase, train/val loss and accuracy, images/s and the time left at most."""
    phase = "head only" if stats.phase == "head" else "all layers"
    if math.isnan(left_s):
        left = ""
    elif stats.epoch >= max_epochs or left_s <= 0:
        left = ", last epoch"
    else:
        minutes, seconds = divmod(round(left_s), 60)
        left = f", at most {minutes}:{seconds:02d} left (early stopping may end sooner)"
    return (
        f"epoch {stats.epoch}/{max_epochs} [{phase}]  train loss {stats.train_loss:.3f} acc {stats.train_accuracy:.3f}"
        f"  |  val loss {stats.val_loss:.3f} acc {stats.val_accuracy:.3f}  |  {stats.images_per_second:.0f} img/s, "
        f"{stats.seconds:.1f} s{left}"
    )


_CURVE_KEYS = ("epoch", "phase", "train_loss", "train_accuracy", "val_loss", "val_accuracy")


def _curve_rows(history: Sequence[EpochStats] | Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """History entries as dicts sorted by epoch; ValueError if empty or an entry lacks a needed key."""
    rows = []
    for number, item in enumerate(history):
        if isinstance(item, EpochStats):
            row = dataclasses.asdict(item)
        elif isinstance(item, Mapping):
            row = dict(item)
        else:
            raise TypeError(f"history entry {number} must be an EpochStats or a dict, got {type(item).__name__}")
        missing = [key for key in _CURVE_KEYS if key not in row]
        if missing:
            raise ValueError(f"history entry {number} lacks {', '.join(missing)}")
        rows.append(row)
    if not rows:
        raise ValueError("history is empty: no epochs to plot")
    return sorted(rows, key=lambda row: int(row["epoch"]))


def curve_marks(history: Sequence[EpochStats] | Sequence[Mapping[str, Any]]) -> tuple[int | None, int | None]:
    """(first all-layers epoch after head-only epochs or None, best epoch = first lowest finite val loss or None)."""
    rows = _curve_rows(history)
    unfreeze = None
    for previous, row in zip(rows, rows[1:], strict=False):
        if previous["phase"] == "head" and row["phase"] == "all":
            unfreeze = int(row["epoch"])
            break
    finite = [row for row in rows if math.isfinite(float(row["val_loss"]))]
    best = int(min(finite, key=lambda row: float(row["val_loss"]))["epoch"]) if finite else None
    return unfreeze, best


def plot_learning_curves(history: list[EpochStats] | list[dict], path: Path) -> Path:
    """PNG of train/val loss and accuracy per epoch, a dashed line where all layers unfreeze, a star at the best."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg only: no display, no pyplot global state
    from matplotlib.figure import Figure

    rows = _curve_rows(history)
    unfreeze, best = curve_marks(rows)
    epochs = [int(row["epoch"]) for row in rows]
    figure = Figure(figsize=(10, 4), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    for axes, key in zip(figure.subplots(1, 2), ("loss", "accuracy"), strict=True):
        val = [float(row[f"val_{key}"]) for row in rows]
        axes.plot(epochs, [float(row[f"train_{key}"]) for row in rows], marker="o", markersize=3, label="train")
        axes.plot(epochs, val, marker="o", markersize=3, label="val")
        if unfreeze is not None:
            axes.axvline(unfreeze - 0.5, color="grey", linestyle="--", label=f"all layers from epoch {unfreeze}")
        if best is not None:
            best_value = val[epochs.index(best)]
            axes.plot([best], [best_value], marker="*", markersize=14, color="red", linestyle="none")
            axes.annotate(f"best (epoch {best})", (best, best_value), textcoords="offset points", xytext=(6, 6))
        axes.set_xlabel("epoch")
        axes.set_ylabel(key)
        axes.set_title(f"{key} per epoch")
        axes.grid(alpha=0.3)
        axes.legend()
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    return path
