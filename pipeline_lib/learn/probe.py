"""train.mode probe: a frozen backbone, its features of each image computed once and cached (learn/features.py),
and a small head (linear or MLP, learn/heads.py) trained on them with early stopping on the validation loss.

The head is trained with torch (AdamW on mini-batches) rather than scikit-learn's LogisticRegression: one code
path for the linear and the MLP head, the class weights and label smoothing of the fine-tuning recipe, early
stopping on the same validation loss, and the result is the nn.Module head of the Classifier as it is (its
state_dict, Grad-CAM's gradients through it) with no conversion. It trains on the CPU (on one thread, HEAD_THREADS):
the features of 100,000 images of a ViT-L are 0.4 GB, and the head's epochs cost little next to embedding the
images (benchmarks/bench_foundation.py: probe_fit_s).

The checkpoint of a probe on a published backbone holds the head and the backbone's file name and sha256, not the
backbone (see models.Classifier.backbone_reference): 1.2 GB of ViT-L weights per run and per registered version
would only repeat the file every run starts from.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from pipeline_lib.core import devices
from pipeline_lib.core.config import LABELS, NormalizeConfig, ProbeConfig, TrainConfig
from pipeline_lib.core.workspace import Workspace
from pipeline_lib.learn import features, foundation, heads, models, preprocess
from pipeline_lib.learn.checkpoints import BEST_NAME
from pipeline_lib.learn.datasets import class_balance, loss_weights, train_val_rows
from pipeline_lib.learn.history import EpochStats
from pipeline_lib.learn.train import TrainResult

log = logging.getLogger(__name__)

PHASE = "probe"
# The head's operations are tiny: split across threads they cost more than they save. On 2 shared cores (load average
# 10-16), 20 epochs on 1,000 x 768 features took 0.94 s on one thread and 15.8 s on two (benchmarks/
# bench_foundation.py, head_fit_threads, measures both in one run; docs/backbones.md).
HEAD_THREADS = 1


def _active(policy: NormalizeConfig | None) -> NormalizeConfig | None:
    return policy if policy is not None and policy.mode != "none" else None


def backbone_extractor(
    model: models.Classifier, image_size: int, policy: NormalizeConfig | None = None, batch_size: int = 32
) -> features.Extractor:
    """The Extractor of model's backbone: keyed by its architecture, the digest of the backbone's weights (not the
    head's: a new head reuses every vector), the input size and the normalisation policy."""
    active = _active(policy)
    identity = {
        "architecture": model.name,
        "weights": features.state_digest(model.backbone),
        "image_size": str(image_size),
        "normalize": "none" if active is None else json.dumps(active.model_dump(mode="json"), sort_keys=True),
    }
    return features.Extractor(
        name=f"backbone:{model.name}",
        identity=identity,
        producers=(features.classifier_input, features.penultimate_forward, models.Classifier),
        model=model,
        load=functools.partial(features.classifier_input, size=image_size, policy=active),
        forward=features.penultimate_forward,
        dim=model.feature_count,
        batch_size=batch_size,
        details={"backbone": model.name},
    )


def embed_rows(
    workspace: Workspace, extractor: features.Extractor, shas: Sequence[str], device: str = "cpu"
) -> features.Embeddings:
    """Features of the stored originals of shas (in that order), from the cache or computed now."""
    images = {str(sha): preprocess.find_original(workspace, str(sha)) for sha in dict.fromkeys(map(str, shas))}
    return features.embed(workspace, extractor, images, device=device)


def cached_logits(
    workspace: Workspace,
    model: models.Classifier,
    shas: Sequence[str],
    image_size: int,
    policy: NormalizeConfig | None = None,
    device: str = "cpu",
) -> np.ndarray:
    """Logits [N, 2] of a probe model for stored images: the backbone's features from the cache (computed and
    stored for images seen the first time), then the head."""
    if not shas:
        return np.empty((0, len(models.CLASSES)), dtype=np.float32)
    extractor = backbone_extractor(model, image_size, policy)
    found = embed_rows(workspace, extractor, shas, devices.resolve_device(device))
    position = {sha: row for row, sha in enumerate(found.shas)}
    rows = torch.from_numpy(found.matrix[[position[str(sha)] for sha in shas]])
    head = model.head
    was_training = head.training
    try:
        with torch.inference_mode():
            home = next(head.parameters()).device
            return head.eval()(rows.to(home)).float().cpu().numpy()
    finally:
        head.train(was_training)


@dataclass(frozen=True)
class ProbeFit:
    """The trained head's best state and how training went."""

    state: dict[str, torch.Tensor]
    history: list[EpochStats]
    best_epoch: int
    best_val_loss: float
    stopped_early: bool


def _batches(n: int, size: int, generator: torch.Generator) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=generator)
    return [order[start : start + size] for start in range(0, n, size)]


def _undersampled(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Indices of all images of the smaller class and as many drawn afresh from each larger one (undersample)."""
    groups = [torch.nonzero(labels == value).flatten() for value in labels.unique()]
    least = min(len(group) for group in groups)
    picked = [group[torch.randperm(len(group), generator=generator)[:least]] for group in groups]
    return torch.cat(picked).sort().values


def _evaluate(head: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(mean unweighted cross-entropy, accuracy) of head on features x with labels y."""
    head.eval()
    with torch.inference_mode():
        logits = head(x)
        loss = nn.functional.cross_entropy(logits, y).item()
        accuracy = (logits.argmax(dim=1) == y).float().mean().item()
    return float(loss), float(accuracy)


def _epoch(
    head: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    batches: list[torch.Tensor],
) -> tuple[float, float]:
    """One pass over the training features in the given batches: (mean loss, accuracy)."""
    head.train()
    total, correct, seen = 0.0, 0, 0
    for index in batches:
        optimizer.zero_grad(set_to_none=True)
        logits = head(x[index])
        loss = criterion(logits, y[index])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"probe training loss became {loss.item()} (lower train.probe.lr?)")
        loss.backward()
        optimizer.step()
        total += float(loss.item()) * len(index)
        correct += int((logits.argmax(dim=1) == y[index]).sum().item())
        seen += len(index)
    return total / max(seen, 1), correct / max(seen, 1)


def fit_head(
    head: heads.ProbeHead,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    config: ProbeConfig,
    seed: int = 0,
    class_weights: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    undersample: bool = False,
    on_epoch: Callable[[EpochStats], None] | None = None,
    threads: int = HEAD_THREADS,
) -> ProbeFit:
    """Train head on (features, labels) with AdamW, early stopping on the validation loss; head keeps the best state.
    threads: the CPU threads torch uses meanwhile (HEAD_THREADS).

    1. The features are standardised with the training split's mean and std (inside the head, so it is saved).
    2. Each epoch's order (and undersampled subset) is drawn from (seed, epoch): a run is reproducible.
    3. The validation loss is unweighted, as in fine-tuning; the best epoch's state is kept.
    """
    (train_x, train_y), (val_x, val_y) = train, val
    head.standardise_with(train_x)  # 1.
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    criterion = nn.CrossEntropyLoss(weight=class_weights, label_smoothing=label_smoothing)
    best_state, best_loss, best_epoch, bad, history = copy.deepcopy(head.state_dict()), math.inf, 0, 0, []
    with torch.random.fork_rng(devices=[]), _threads(threads):  # the caller's generator is left as it was
        for epoch in range(1, config.epochs + 1):
            started = time.perf_counter()
            seed_of_epoch = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
            generator = torch.Generator().manual_seed(seed_of_epoch)
            chosen = _undersampled(train_y, generator) if undersample else torch.arange(len(train_y))  # 2.
            batches = [chosen[index] for index in _batches(len(chosen), config.batch_size, generator)]
            torch.manual_seed(seed_of_epoch)  # dropout draws depend on (seed, epoch) only
            train_loss, train_accuracy = _epoch(head, train_x, train_y, optimizer, criterion, batches)
            train_seconds = time.perf_counter() - started
            val_loss, val_accuracy = _evaluate(head, val_x, val_y)  # 3.
            stats = EpochStats(epoch, PHASE, train_loss, train_accuracy, val_loss, val_accuracy, config.lr,
                               time.perf_counter() - started, len(chosen) / max(train_seconds, 1e-9))  # fmt: skip
            history.append(stats)
            if on_epoch is not None:
                on_epoch(stats)
            if val_loss < best_loss:
                best_state, best_loss, best_epoch, bad = copy.deepcopy(head.state_dict()), val_loss, epoch, 0
            else:
                bad += 1
            if bad >= config.patience:
                break
    if best_epoch == 0:
        raise FloatingPointError("the probe's validation loss was never finite")
    head.load_state_dict(best_state)
    return ProbeFit(copy.deepcopy(best_state), history, best_epoch, best_loss, len(history) < config.epochs)


@contextlib.contextmanager
def _threads(count: int) -> Iterator[None]:
    """torch on count CPU threads for a block, then as it was."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _labels(rows: pd.DataFrame) -> torch.Tensor:
    return torch.tensor([LABELS.index(str(label)) for label in rows["label"]], dtype=torch.long)


def build_probe_model(config: TrainConfig) -> tuple[models.Classifier, models.WeightsInfo]:
    """The model a probe run starts from: config.model with config.weights (random parts from config.seed, so that a
    random backbone is the same every run and its cached features are reused), config.probe's head, and the
    backbone marked as the published file it is (models.reference_backbone)."""
    foundation.check_input_size(config.model, config.image_size)
    spec = heads.probe_spec(config.probe.head, config.probe.hidden, config.probe.dropout)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model, weights = models.build_model(config.model, config.weights, config.weights_url, head=spec)
    models.reference_backbone(model, weights, config.weights_url)
    return model, weights


def train_probe(
    workspace: Workspace,
    catalog: pd.DataFrame,
    config: TrainConfig,
    out_dir: Path,
    on_epoch: Callable[[EpochStats], None] | None = None,
    policy: NormalizeConfig | None = None,
) -> TrainResult:
    """Embed the train and val images with the frozen backbone (cached: only images never embedded before are
    computed), train the probe head on their features, write out_dir/best.pt.

    The backbone is config.model with config.weights; the head is config.probe's; class balance and label smoothing
    are config's; augmentation does not apply (each image has one cached feature vector).
    """
    train_rows, val_rows = train_val_rows(catalog)
    device = devices.resolve_device(config.device)
    model, weights = build_probe_model(config)
    extractor = backbone_extractor(model, config.image_size, policy, config.batch_size)
    shas = [*train_rows["sha256"].astype(str), *val_rows["sha256"].astype(str)]
    found = embed_rows(workspace, extractor, shas, device)
    matrix = torch.from_numpy(found.matrix)
    train_x, val_x = matrix[: len(train_rows)], matrix[len(train_rows) :]
    balance = class_balance(_labels(train_rows).tolist(), config.class_balance)
    log.info("probe on %s features (%s): %d computed, %d from the cache; head %s", config.model, found.key,
             found.computed, found.reused, model.head_spec)  # fmt: skip
    fit = fit_head(
        model.head, (train_x, _labels(train_rows)), (val_x, _labels(val_rows)), config.probe, config.seed,
        loss_weights(balance), config.label_smoothing, config.class_balance == "undersample", on_epoch,
    )  # fmt: skip
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    best = out_dir / BEST_NAME
    models.save_checkpoint(best, model, _meta(config, weights, fit, found))
    return TrainResult(
        best_path=best,
        last_path=best,
        best_epoch=fit.best_epoch,
        best_val_loss=fit.best_val_loss,
        history=fit.history,
        stopped_early=fit.stopped_early,
        weights=weights,
        device=device,
        balance=balance.metrics(),
        augment_on="none",
        mode=PHASE,
        features={"computed": float(found.computed), "reused": float(found.reused)},
    )


def _meta(
    config: TrainConfig, weights: models.WeightsInfo, fit: ProbeFit, found: features.Embeddings
) -> dict[str, object]:
    best = fit.history[fit.best_epoch - 1]
    return {
        "model_name": config.model,
        "image_size": config.image_size,
        "weights_name": weights.name,
        "weights_sha256": weights.sha256,
        "epoch": fit.best_epoch,
        "val_loss": best.val_loss,
        "val_accuracy": best.val_accuracy,
        "seed": config.seed,
        "mode": PHASE,
        "features_key": found.key,
    }
