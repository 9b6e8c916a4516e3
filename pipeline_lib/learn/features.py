"""Per-image feature cache: what an embedding model makes of each image, computed once per (image, model, code).

An `Extractor` describes the model that embeds: its name, the identity parts that change its output (a weights
digest, the input size, the normalisation), the functions whose code produces the features, how one image file
becomes the model's input, and the call that turns a batch into penultimate features. Everything specific to a
backbone lives in the extractor; the cache below knows only arrays.

Layout: cache/features/<key>/<sha[:2]>/<sha256>.npy (a float32 vector), key = digest of the name, the identity
parts and code_index.producer_digest(producers), so a new model, a changed identity or an edit of the producing
code starts a new folder; cache/features/<key>/extractor.json says what made the folder (for people only: nothing
reads it back).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline_lib.core import devices
from pipeline_lib.core.code_index import CodeIndex, producer_digest, producer_parts
from pipeline_lib.core.config import NormalizeConfig
from pipeline_lib.core.progress import progress
from pipeline_lib.core.workspace import Workspace, atomic_write_bytes, atomic_write_text, digest_of
from pipeline_lib.learn import models
from pipeline_lib.learn.preprocess import decode_image

log = logging.getLogger(__name__)

FEATURES_FOLDER = "features"
ABOUT_FILE = "extractor.json"
KEY_LENGTH = 32  # hex digits of a cache folder's name (128 bits)
PENULTIMATE = "penultimate"  # the block of a classifier's vector that its head reads

LoadFn = Callable[[Path, str], np.ndarray]  # (image file, its sha256) -> the model's input for that one image
ForwardFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]  # (model, stacked inputs on the device) -> [N, dim]


class FeatureError(ValueError):
    """Images could not be embedded (unreadable files, a model that gives the wrong shape); the message names them."""


@dataclass(frozen=True)
class Extractor:
    """A model that embeds images, with what makes its output what it is.

    name: what people call it ("champion:aidetect/3", "resnet50:imagenet"); identity: the parts that change the
    output (weights digest, input size, normalisation); producers: the functions (and classes) whose code makes the
    features, for producer_digest; load: one file -> model input; forward: a batch -> [N, dim] features; blocks:
    named consecutive column ranges of a vector (name, width), e.g. the penultimate features then pooled early ones
    (default: one block, "features").
    """

    name: str
    identity: Mapping[str, str]
    producers: tuple[Callable[..., Any], ...]
    model: nn.Module
    load: LoadFn
    forward: ForwardFn
    dim: int
    batch_size: int = 32
    details: Mapping[str, Any] = field(default_factory=dict)  # written to extractor.json, never part of the key
    blocks: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("an extractor needs a name")
        if not self.producers:
            raise ValueError(f"extractor {self.name!r} names no producing code (producers)")
        if self.dim < 1 or self.batch_size < 1:
            raise ValueError(
                f"extractor {self.name!r}: dim and batch_size must be >= 1, got {self.dim}, {self.batch_size}"
            )
        if self.blocks and sum(width for _, width in self.blocks) != self.dim:
            raise ValueError(f"extractor {self.name!r}: its blocks {self.blocks} do not add up to dim {self.dim}")

    def block_slices(self) -> dict[str, slice]:
        """name -> the columns of that block in a feature vector."""
        slices, start = {}, 0
        for name, width in self.blocks or (("features", self.dim),):
            slices[name] = slice(start, start + width)
            start += width
        return slices


@dataclass(frozen=True)
class Embeddings:
    """Features of images in the asked order, and how many were computed now or read from the cache."""

    shas: tuple[str, ...]
    matrix: np.ndarray  # float32 [N, dim]
    computed: int
    reused: int
    key: str


def state_digest(model: nn.Module) -> str:
    """sha256 of a model's state dict (names, dtypes, shapes and values): the identity of its weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        value = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{value.dtype}:{list(value.shape)}\0".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


def key_parts(extractor: Extractor, index: CodeIndex | None = None) -> dict[str, str]:
    """The parts of a cache key: name, identity.* and code, the producers' digest (code_index.producer_digest,
    remembered per process when no index is given)."""
    parts = {"name": extractor.name}
    parts |= {f"identity.{name}": str(value) for name, value in extractor.identity.items()}
    return parts | {"code": producer_digest(*extractor.producers, index=index)}


def cache_key(extractor: Extractor, index: CodeIndex | None = None) -> str:
    """The folder name of an extractor's features: digest of its name, identity and producing code."""
    return _key_of(key_parts(extractor, index))


def _key_of(parts: Mapping[str, str]) -> str:
    return digest_of(*(f"{name}={value}" for name, value in sorted(parts.items())))[:KEY_LENGTH]


def features_root(workspace: Workspace) -> Path:
    """cache/features: one folder per extractor key."""
    return workspace.cache / FEATURES_FOLDER


def feature_path(workspace: Workspace, key: str, sha256: str) -> Path:
    """cache/features/<key>/<sha[:2]>/<sha256>.npy."""
    if len(sha256) < 3 or any(c not in "0123456789abcdef" for c in sha256):
        raise ValueError(f"sha256 must be a lowercase hex digest, got {sha256!r}")
    return features_root(workspace) / key / sha256[:2] / f"{sha256}.npy"


def _read_vector(path: Path, dim: int) -> np.ndarray | None:
    """A cached vector, or None when it is missing or damaged (unreadable, wrong dtype or shape, not finite)."""
    try:
        vector = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, EOFError) as error:
        log.warning("cached features %s are unreadable (%s); computing them again", path, error)
        return None
    if vector.dtype != np.float32 or vector.shape != (dim,) or not np.isfinite(vector).all():
        log.warning("cached features %s hold %s %s, expected finite float32 (%d,); computing them again",
                    path, vector.dtype, vector.shape, dim)  # fmt: skip
        return None
    return vector


def _write_vector(path: Path, vector: np.ndarray) -> None:
    """Save one vector atomically; not fsynced: a file lost in a crash is only recomputed (see _read_vector)."""
    buffer = io.BytesIO()
    np.save(buffer, vector, allow_pickle=False)
    atomic_write_bytes(path, buffer.getvalue(), durable=False)


def _write_about(folder: Path, extractor: Extractor, parts: Mapping[str, str], index: CodeIndex | None) -> None:
    """extractor.json: what made this folder, the producers' code parts included (for people; the key already says
    everything the cache needs)."""
    target = folder / ABOUT_FILE
    if target.is_file():
        return
    about = {
        "name": extractor.name,
        "dim": extractor.dim,
        "key_parts": dict(sorted(parts.items())),
        "code_parts": dict(sorted(producer_parts(*extractor.producers, index=index).items())),
        "details": dict(extractor.details),
        "created": datetime.now(UTC).isoformat(),
    }
    atomic_write_text(target, json.dumps(about, indent=1, default=str) + "\n")


@contextlib.contextmanager
def _evaluating(model: nn.Module, device: str) -> Iterator[nn.Module]:
    """The model in eval mode on device for a block, then back on its device and in its mode."""
    params = list(model.parameters())
    home = params[0].device if params else None
    was_training = model.training
    try:
        yield model.to(device).eval()
    finally:
        if home is not None:
            model.to(home)
        model.train(was_training)


def _load_batch(extractor: Extractor, items: list[tuple[str, Path]]) -> torch.Tensor:
    """The stacked model inputs of (sha256, file) items; FeatureError naming every file that cannot be read."""
    arrays, failed = [], []
    for sha256, path in items:
        try:
            arrays.append(extractor.load(Path(path), sha256))
        except Exception as error:  # PIL and the extractor's own loaders raise many types; each is named
            failed.append(f"{Path(path).name}: {type(error).__name__}: {error}")
    if failed:
        shown = "; ".join(failed[:5]) + (f" (+{len(failed) - 5} more)" if len(failed) > 5 else "")
        raise FeatureError(f"{extractor.name}: {len(failed)} image(s) cannot be embedded: {shown}")
    return torch.from_numpy(np.stack(arrays))


def _compute(extractor: Extractor, items: list[tuple[str, Path]], device: str) -> np.ndarray:
    """Features [len(items), dim] of items, in batches on device."""
    batches = [items[start : start + extractor.batch_size] for start in range(0, len(items), extractor.batch_size)]
    chunks = []
    with _evaluating(extractor.model, device) as model, torch.inference_mode():
        for batch in progress(batches, len(items), f"embedding ({extractor.name})", step=extractor.batch_size):
            out = extractor.forward(model, _load_batch(extractor, batch).to(device))
            if out.ndim != 2 or out.shape != (len(batch), extractor.dim):
                raise FeatureError(
                    f"{extractor.name} returned features shaped {list(out.shape)}, expected [{len(batch)}, "
                    f"{extractor.dim}]"
                )
            chunks.append(out.float().cpu().numpy())
    matrix = np.concatenate(chunks).astype(np.float32, copy=False)
    bad = [items[i][1].name for i in np.flatnonzero(~np.isfinite(matrix).all(axis=1))]
    if bad:
        raise FeatureError(f"{extractor.name} gives non-finite features for {len(bad)} image(s): {', '.join(bad[:5])}")
    return matrix


def embed(
    workspace: Workspace,
    extractor: Extractor,
    images: Mapping[str, Path],
    device: str = "cpu",
    index: CodeIndex | None = None,
) -> Embeddings:
    """Features of images (sha256 -> stored file) in that order: cached ones read, missing or damaged ones computed
    in batches on device and stored.

    Raises FeatureError naming the files that cannot be embedded; nothing is stored for a batch that failed.
    """
    parts = key_parts(extractor, index)
    key = _key_of(parts)
    shas = tuple(images)
    rows: dict[str, np.ndarray] = {}
    for sha in shas:
        vector = _read_vector(feature_path(workspace, key, sha), extractor.dim)
        if vector is not None:
            rows[sha] = vector
    missing = [(sha, Path(images[sha])) for sha in shas if sha not in rows]
    if missing:
        _write_about(workspace.cache / FEATURES_FOLDER / key, extractor, parts, index)
        computed = _compute(extractor, missing, devices.resolve_device(device))
        for (sha, _), vector in zip(missing, computed, strict=True):
            _write_vector(feature_path(workspace, key, sha), vector)
            rows[sha] = vector
    log.info("features %s (%s): %d computed, %d from the cache", extractor.name, key, len(missing),
             len(shas) - len(missing))  # fmt: skip
    matrix = np.stack([rows[sha] for sha in shas]) if shas else np.empty((0, extractor.dim), np.float32)
    return Embeddings(shas, matrix, len(missing), len(shas) - len(missing), key)


# --- the project's own classifiers (a champion, a trained checkpoint) as extractors ---


def classifier_input(path: Path, sha256: str, size: int, policy: NormalizeConfig | None) -> np.ndarray:
    """One file as a Classifier sees it in training: uint8 (3, size, size), decoded as the tensor cache decodes."""
    return decode_image(path, size, policy, sha256)


def penultimate_forward(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """A Classifier's penultimate features (the head's input) for a uint8 batch."""
    return model.features(batch.float() / 255.0)


def classifier_forward(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """A Classifier's penultimate features (the head's input), then its first stage's output averaged over the
    image (colour and texture), for a uint8 batch; the penultimate features alone for a backbone without a
    convolutional first stage (a vision transformer)."""
    stage = models.first_stage(model)
    if stage is None:
        return penultimate_forward(model, batch)
    early: list[torch.Tensor] = []
    hook = stage.register_forward_hook(lambda _m, _i, out: early.append(out.mean(dim=(2, 3))))
    try:
        late = model.features(batch.float() / 255.0)
    finally:
        hook.remove()
    return torch.cat([late, early[0]], dim=1)


def classifier_extractor(
    model: models.Classifier, name: str, image_size: int, policy: NormalizeConfig | None = None, batch_size: int = 32
) -> Extractor:
    """An Extractor of a trained Classifier: name e.g. "champion:aidetect/3", keyed by its weights, size and policy.

    Its vectors hold two blocks: the penultimate features (PENULTIMATE, what the head reads) and the first stage's
    pooled output ("first_stage")."""
    if not isinstance(model, models.Classifier):
        raise TypeError(f"classifier_extractor needs a learn.models.Classifier, got {type(model).__name__}")
    active = policy if policy is not None and policy.mode != "none" else None
    identity = {
        "architecture": model.name,
        "weights": state_digest(model),
        "image_size": str(image_size),
        "normalize": "none" if active is None else json.dumps(active.model_dump(mode="json"), sort_keys=True),
    }
    early = _first_stage_width(model)
    return Extractor(
        name=name,
        identity=identity,
        producers=(classifier_input, classifier_forward, models.Classifier),
        model=model,
        load=functools.partial(classifier_input, size=image_size, policy=active),
        forward=classifier_forward,
        dim=model.feature_count + early,
        batch_size=batch_size,
        blocks=((PENULTIMATE, model.feature_count), ("first_stage", early))[: 2 if early else 1],
    )


def _first_stage_width(model: models.Classifier) -> int:
    """Channels of model's first stage (0 without one): a forward of a tiny image tells them."""
    if models.first_stage(model) is None:
        return 0
    with _evaluating(model, "cpu"), torch.inference_mode():
        return classifier_forward(model, torch.zeros((1, 3, 32, 32), dtype=torch.uint8)).shape[1] - model.feature_count
