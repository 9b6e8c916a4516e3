"""The classifier: a torchvision backbone with a 2-class head (real, ai), its weights and its checkpoints."""

from __future__ import annotations

import http.client
import logging
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch
import torchvision
from torch import nn

from pipeline_lib.core.workspace import atomic_path, file_sha256

log = logging.getLogger(__name__)

CLASSES: tuple[str, ...] = ("real", "ai")  # index 1 = ai
MODEL_NAMES: tuple[str, ...] = ("resnet50", "resnet18", "efficientnet_b0", "convnext_tiny")
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
CHECKPOINT_FORMAT = "aidetect-checkpoint-v1"

# The torchvision ImageNet head each backbone loses (its keys are dropped from torchvision state dicts).
_HEAD_PREFIX: dict[str, str] = {
    "resnet50": "fc.",
    "resnet18": "fc.",
    "efficientnet_b0": "classifier.1.",
    "convnext_tiny": "classifier.2.",
}


class WeightsNotFoundError(FileNotFoundError):
    """Initial weights are not on disk and could not be fetched; the message names the file, URL and command."""


class WeightsError(ValueError):
    """A weights file is unreadable or does not fit the model."""


class CheckpointError(ValueError):
    """A model checkpoint is corrupt or not an aidetect checkpoint; the message names the file."""


@dataclass(frozen=True)
class WeightsFile:
    """ImageNet weights in TORCH_HOME's cache: where, their sha256, and whether this call downloaded them."""

    path: Path
    sha256: str
    downloaded: bool


@dataclass(frozen=True)
class WeightsInfo:
    """Provenance of the initial weights: 'none', 'imagenet' or a file path, and the file's sha256 ("" for none)."""

    name: str
    sha256: str


def _check_name(name: str) -> None:
    if name not in MODEL_NAMES:
        raise ValueError(f"train.model must be one of {', '.join(MODEL_NAMES)}, got {name!r}")


def _torchvision_backbone(name: str) -> nn.Module:
    """A randomly initialised torchvision model with its ImageNet head still attached."""
    _check_name(name)
    return torchvision.models.get_model(name, weights=None)


def _drop_head(name: str, model: nn.Module) -> int:
    """Replace the torchvision ImageNet head's final Linear by Identity; return its input feature count."""
    if name.startswith("resnet"):
        features = model.fc.in_features
        model.fc = nn.Identity()
    elif name == "efficientnet_b0":
        features = model.classifier[1].in_features
        model.classifier[1] = nn.Identity()
    else:  # convnext: keep LayerNorm2d + Flatten (pretrained), drop the Linear
        features = model.classifier[2].in_features
        model.classifier[2] = nn.Identity()
    return int(features)


class Classifier(nn.Module):
    """Backbone + Linear(features, 2); input float [0, 1] (N,3,H,W), ImageNet-normalised inside; logits (real, ai)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.classes = CLASSES
        full = _torchvision_backbone(name)
        features = _drop_head(name, full)
        self.backbone = full
        self.head = nn.Linear(features, len(CLASSES))
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [N, 2] for float images in [0, 1]."""
        return self.head(self.features(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate features [N, feature_count] (the head's input) for float images in [0, 1]."""
        if not x.is_floating_point():
            raise TypeError(f"Classifier expects float images in [0, 1] (divide uint8 by 255), got {x.dtype}")
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"Classifier expects images shaped [N,3,H,W], got {list(x.shape)}")
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        return self.backbone(x)

    @property
    def feature_count(self) -> int:
        """Length of one image's features (the head's input size)."""
        return int(self.head.in_features)

    def head_parameters(self) -> list[nn.Parameter]:
        """Parameters of the 2-class head."""
        return list(self.head.parameters())

    def backbone_parameters(self) -> list[nn.Parameter]:
        """Parameters of the backbone (everything but the head)."""
        return list(self.backbone.parameters())


_HASH_PREFIX = re.compile(r"-([a-f0-9]{8,})\.")  # the sha256 prefix torch.hub checks in a weights file name


def imagenet_weights_url(name: str) -> str:
    """torchvision's download URL of the default ImageNet weights for name."""
    _check_name(name)
    return str(torchvision.models.get_model_weights(name).DEFAULT.url)


def imagenet_weights_path(name: str, url: str | None = None) -> Path:
    """Where torch.hub keeps the weights downloaded from url (default: torchvision's): TORCH_HOME's checkpoints."""
    _check_name(name)
    source = url or imagenet_weights_url(name)
    return Path(torch.hub.get_dir()) / "checkpoints" / posixpath.basename(urlsplit(source).path)


def fetch_command(name: str) -> str:
    """The command that downloads the ImageNet weights of name into TORCH_HOME's cache."""
    return f"aidetect weights fetch {name}"


def _missing_message(name: str, path: Path, url: str, reason: str) -> str:
    return (
        f"ImageNet weights for {name} are not in TORCH_HOME's cache: {path} ({reason}). Fetch them with "
        f"`{fetch_command(name)}`, which downloads {url} (hash-checked) to that file; offline, download the file "
        "on another machine and copy it there (or set TORCH_HOME). Or set train.weights to a local state_dict file, "
        "or train.weights=none to start from random weights."
    )


def _checked_sha256(path: Path) -> str:
    """The file's sha256; WeightsError when it does not start with the prefix the file name carries."""
    digest = file_sha256(path)
    match = _HASH_PREFIX.search(path.name)
    if match and not digest.startswith(match.group(1)):
        raise WeightsError(
            f"weights file {path} is damaged: its sha256 {digest[:16]}... does not start with {match.group(1)} as "
            "its name says; delete it and fetch it again"
        )
    return digest


def fetch_imagenet_weights(name: str, url: str | None = None, progress: bool = True) -> WeightsFile:
    """The ImageNet weights of name in TORCH_HOME's cache, downloaded from url (default: torchvision's) if missing.

    The download goes through torch.hub (a progress bar, the sha256 prefix in the file name checked, nothing kept
    when it fails). Raises WeightsNotFoundError naming the file, URL and command when the download fails
    (offline), WeightsError when the hash does not match or the file is not a state dict.
    """
    source = url or imagenet_weights_url(name)
    path = imagenet_weights_path(name, source)
    if path.is_file():
        return WeightsFile(path, _checked_sha256(path), downloaded=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading the ImageNet weights of %s from %s to %s", name, source, path)
    try:
        torch.hub.load_state_dict_from_url(
            source, str(path.parent), map_location="cpu", progress=progress, check_hash=True, weights_only=True
        )
    except (OSError, http.client.HTTPException) as error:  # URLError, HTTPError, timeouts, a dropped connection
        raise WeightsNotFoundError(_missing_message(name, path, source, f"the download failed: {error}")) from None
    except RuntimeError as error:
        if "hash" not in str(error):
            raise WeightsError(f"weights downloaded from {source} to {path} are unreadable: {error}") from None
        raise WeightsError(f"download of {source} rejected, nothing was stored: {error}") from None
    except Exception as error:  # torch.load raises many types for a file that is not a state dict
        raise WeightsError(f"weights downloaded from {source} to {path} are not a state dict: {error}") from None
    digest = file_sha256(path)
    log.info("downloaded the ImageNet weights of %s: %s (sha256 %s)", name, path, digest)
    return WeightsFile(path, digest, downloaded=True)


def ensure_initial_weights(name: str, weights: str, url: str | None = None, progress: bool = True) -> Path | None:
    """Before any stage runs: the file train.weights names is on disk, ImageNet weights downloaded if missing.

    Returns the file (None for 'none'); WeightsNotFoundError / WeightsError as fetch_imagenet_weights.
    """
    _check_name(name)
    if weights == "none":
        return None
    if weights == "imagenet":
        fetched = fetch_imagenet_weights(name, url, progress)
        log.info("initial weights of %s: imagenet, %s (sha256 %s)", name, fetched.path, fetched.sha256)
        return fetched.path
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsNotFoundError(
            f"weights file {path} not found: train.weights must be 'imagenet', 'none' or an existing state_dict file"
        )
    return path


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a file (torch.load weights_only); an aidetect checkpoint's state_dict is unwrapped."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many types for bad files
        raise WeightsError(f"weights file {path} is not a readable torch state_dict: {error}") from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise WeightsError(f"weights file {path} must hold a state_dict (a dict of tensors), got {type(data).__name__}")
    return data


def _mismatch_message(path: Path, expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> str:
    """Describe missing, unexpected and wrongly shaped keys (a few of each)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = [
        f"{k} {list(found[k].shape)} != {list(expected[k].shape)}"
        for k in sorted(set(expected) & set(found))
        if found[k].shape != expected[k].shape
    ]
    parts = []
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
            parts.append(f"{title}: {', '.join(items[:5])}{more}")
    return f"weights file {path} does not fit the model: " + "; ".join(parts)


def _load_into(model: Classifier, path: Path) -> None:
    """Load a Classifier state dict (backbone.*/head.*) or a torchvision one (its ImageNet head ignored)."""
    state = _read_state_dict(path)
    if any(key.startswith("backbone.") for key in state):
        expected = model.state_dict()
        target: nn.Module = model
    else:
        prefix = _HEAD_PREFIX[model.name]
        state = {k: v for k, v in state.items() if not k.startswith(prefix)}
        expected = model.backbone.state_dict()
        target = model.backbone
    if set(state) != set(expected) or any(state[k].shape != expected[k].shape for k in expected):
        raise WeightsError(_mismatch_message(path, expected, state))
    target.load_state_dict(state, strict=True)


def build_model(name: str, weights: str, url: str | None = None) -> tuple[Classifier, WeightsInfo]:
    """A Classifier with 'none' (random), 'imagenet' (TORCH_HOME's cache: ensure_initial_weights downloads them
    first) or file-path weights; url is where the ImageNet file comes from (default: torchvision's)."""
    _check_name(name)
    model = Classifier(name)
    if weights == "none":
        return model, WeightsInfo("none", "")
    if weights == "imagenet":
        source = url or imagenet_weights_url(name)
        path = imagenet_weights_path(name, source)
        if not path.is_file():
            raise WeightsNotFoundError(_missing_message(name, path, source, "the file is missing"))
        name_text = "imagenet"
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsNotFoundError(
                f"weights file {path} not found: train.weights must be 'imagenet', 'none' "
                "or an existing state_dict file"
            )
        name_text = str(path)
    _load_into(model, path)
    info = WeightsInfo(name_text, file_sha256(path))
    log.info("built %s with weights %s from %s (sha256 %s)", name, name_text, path, info.sha256)
    return model, info


def target_layer(model: nn.Module) -> nn.Module:
    """The last conv block, for Grad-CAM: resnet layer4[-1], efficientnet features[-1], convnext stages[-1]."""
    if not isinstance(model, Classifier):
        raise TypeError(f"target_layer needs a pipeline_lib.learn.models.Classifier, got {type(model).__name__}")
    if model.name.startswith("resnet"):
        return model.backbone.layer4[-1]
    return model.backbone.features[-1]  # efficientnet blocks; convnext: features[-1] is the last stage


def first_stage(model: nn.Module) -> nn.Module:
    """The first stage of the backbone (resnet layer1, efficientnet and convnext features[1]): its pooled output
    describes colour and texture, which the penultimate features of a trained classifier may no longer tell apart."""
    if not isinstance(model, Classifier):
        raise TypeError(f"first_stage needs a pipeline_lib.learn.models.Classifier, got {type(model).__name__}")
    if model.name.startswith("resnet"):
        return model.backbone.layer1
    return model.backbone.features[1]


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached, contiguous CPU copy of a state dict (loadable anywhere)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def save_checkpoint(path: Path, model: Classifier, meta: dict[str, Any]) -> None:
    """Write {format, state_dict, meta} atomically; meta gets model_name and classes if absent."""
    if not isinstance(model, Classifier):
        raise TypeError(f"save_checkpoint needs a Classifier, got {type(model).__name__}")
    full_meta = {"model_name": model.name, "classes": list(CLASSES), **meta}
    if full_meta["model_name"] != model.name:
        raise ValueError(f"meta model_name {full_meta['model_name']!r} does not match the model ({model.name!r})")
    payload = {"format": CHECKPOINT_FORMAT, "state_dict": _cpu_state(model), "meta": full_meta}
    with atomic_path(Path(path)) as tmp:
        torch.save(payload, tmp)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The raw checkpoint payload; FileNotFoundError / CheckpointError naming path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many types for bad files
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise CheckpointError(f"model checkpoint {path} is corrupt or unreadable: {reason}") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not an aidetect model checkpoint (expected format {CHECKPOINT_FORMAT})")
    meta = payload.get("meta")
    if not isinstance(meta, dict) or not isinstance(payload.get("state_dict"), dict):
        raise CheckpointError(f"model checkpoint {path} lacks its state_dict or meta")
    for key in ("model_name", "image_size"):
        if key not in meta:
            raise CheckpointError(f"model checkpoint {path} meta lacks {key!r}")
    return payload


def load_model(path: Path) -> tuple[Classifier, dict[str, Any]]:
    """Rebuild the Classifier from a checkpoint (no initial weights needed); return (model in eval mode, meta)."""
    payload = read_checkpoint(path)
    meta = dict(payload["meta"])
    name = str(meta["model_name"])
    if name not in MODEL_NAMES:
        raise CheckpointError(f"model checkpoint {path} names unknown model {name!r}")
    model = Classifier(name)
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"model checkpoint {path} does not fit a {name}: {error}") from None
    return model.eval(), meta
