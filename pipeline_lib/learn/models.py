"""The classifier: a backbone (torchvision, or a foundation model of learn/foundation.py) with a 2-class head (real,
ai), its weights and its checkpoints."""

from __future__ import annotations

import http.client
import logging
import posixpath
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch
import torchvision
from torch import nn

from pipeline_lib.core.config import FOUNDATION_MODELS, TORCHVISION_MODELS
from pipeline_lib.core.workspace import atomic_path, file_sha256
from pipeline_lib.learn import foundation, heads
from pipeline_lib.learn.weights import (
    HASH_PREFIX,
    WeightsError,
    WeightsFile,
    WeightsNotFoundError,
    checkpoints_dir,
    mismatch_message,
    not_cached_message,
    read_torch_state,
)

log = logging.getLogger(__name__)

CLASSES: tuple[str, ...] = ("real", "ai")  # index 1 = ai
MODEL_NAMES: tuple[str, ...] = TORCHVISION_MODELS + FOUNDATION_MODELS
PUBLISHED = ("imagenet", "pretrained")  # train.weights values that name a model's published weights
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


class CheckpointError(ValueError):
    """A model checkpoint is corrupt or not an aidetect checkpoint; the message names the file."""


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


def _backbone(name: str) -> tuple[nn.Module, int, tuple[float, ...], tuple[float, ...]]:
    """(randomly initialised backbone giving features, feature count, input mean, input std) of a model name."""
    _check_name(name)
    if foundation.is_foundation(name):
        spec = foundation.spec_of(name)
        module, features = foundation.build_backbone(name)
        return module, features, spec.mean, spec.std
    full = _torchvision_backbone(name)
    return full, _drop_head(name, full), IMAGENET_MEAN, IMAGENET_STD


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
    """Backbone + head; input float [0, 1] (N,3,H,W), normalised inside as the backbone was trained; logits (real,
    ai). head: a spec of learn/heads.py (None: Linear(features, 2), the recipe's head).

    backbone_reference: set when the backbone is a published weights file left as it is (a probe): {"file", "sha256"}.
    Checkpoints and pickles of such a model then hold the head and this reference, not the backbone's weights.
    """

    def __init__(self, name: str, head: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.name = name
        self.classes = CLASSES
        self.head_spec = heads.check_spec(head)
        self.backbone, features, mean, std = _backbone(name)
        self.head = heads.make_head(self.head_spec, features, len(CLASSES))
        self.backbone_reference: dict[str, str] | None = None
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def __reduce_ex__(self, protocol: Any) -> Any:
        """Pickled (MLflow's model format) as head + backbone reference when the backbone is a published file; a
        whole ViT-L would put 1.2 GB into every logged model. Unpickling rebuilds it from TORCH_HOME's cache."""
        if self.backbone_reference is None:
            return super().__reduce_ex__(protocol)
        return rebuild, (self.name, dict(self.head_spec), dict(self.backbone_reference), _cpu_state(self.head))

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
    """The command that downloads the published weights of name into TORCH_HOME's cache."""
    return f"aidetect weights fetch {name}"


def pretrained_path(name: str, url: str | None = None) -> Path:
    """Where the published weights of name are kept (TORCH_HOME's checkpoints)."""
    _check_name(name)
    return foundation.weights_path(name) if foundation.is_foundation(name) else imagenet_weights_path(name, url)


def fetch_weights(name: str, url: str | None = None, progress: bool = True) -> WeightsFile:
    """The published weights of any model name in TORCH_HOME's cache, downloaded hash-checked if missing (ImageNet
    weights for torchvision backbones: fetch_imagenet_weights; foundation ones: foundation.fetch_weights)."""
    _check_name(name)
    if foundation.is_foundation(name):
        return foundation.fetch_weights(name, url, progress)
    return fetch_imagenet_weights(name, url, progress)


def _missing_message(name: str, path: Path, url: str, reason: str) -> str:
    return not_cached_message("ImageNet", name, path, url, reason, local_file="state_dict file")


def _checked_sha256(path: Path) -> str:
    """The file's sha256; WeightsError when it does not start with the prefix the file name carries."""
    digest = file_sha256(path)
    match = HASH_PREFIX.search(path.name)
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


def ensure_initial_weights(
    name: str, weights: str, url: str | None = None, progress: bool = True, image_size: int | None = None
) -> Path | None:
    """Before any stage runs: the backbone can be built (its library installed, image_size fits it) and the file
    train.weights names is on disk, published weights downloaded if missing.

    Returns the file (None for 'none'); WeightsNotFoundError / WeightsError as fetch_weights
    (foundation.BackboneUnavailableError, a WeightsError, names the extra to install); ValueError for image_size.
    """
    _check_name(name)
    foundation.check_available(name)
    if image_size is not None:
        foundation.check_input_size(name, image_size)
    if weights == "none":
        return None
    if weights in PUBLISHED:
        fetched = fetch_weights(name, url, progress)
        log.info("initial weights of %s: %s, %s (sha256 %s)", name, weights, fetched.path, fetched.sha256)
        return fetched.path
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsNotFoundError(
            f"weights file {path} not found: train.weights must be 'imagenet', 'none' or an existing state_dict file"
        )
    return path


def _check_fit(path: Path, target: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load state into target strictly; WeightsError naming missing, unexpected and misshaped keys."""
    expected = target.state_dict()
    if set(state) != set(expected) or any(state[k].shape != expected[k].shape for k in expected):
        raise WeightsError(mismatch_message(path, expected, state))
    target.load_state_dict(state, strict=True)


def _load_into(model: Classifier, path: Path, sha256: str) -> None:
    """Load a weights file: a Classifier state dict (backbone.*/head.*), a torchvision one (its ImageNet head
    ignored), or a foundation backbone's (foundation.read_state: safetensors, weights-only torch, OpenAI's file)."""
    if foundation.is_foundation(model.name):
        state = foundation.read_state(model.name, path, sha256)
        if any(key.startswith("backbone.") for key in state):
            _check_fit(path, model, state)
        else:
            foundation.load_into(model.name, model.backbone, state, path)
        return
    state = read_torch_state(path)
    if any(key.startswith("backbone.") for key in state):
        _check_fit(path, model, state)
        return
    prefix = _HEAD_PREFIX[model.name]
    _check_fit(path, model.backbone, {k: v for k, v in state.items() if not k.startswith(prefix)})


def _published_file(name: str, url: str | None) -> Path:
    """The published weights file of name in TORCH_HOME's cache; WeightsNotFoundError naming the command if absent."""
    path = pretrained_path(name, url)
    if path.is_file():
        return path
    if foundation.is_foundation(name):
        source = foundation.weights_url(name, url)
        raise WeightsNotFoundError(foundation.missing_message(name, path, source, "the file is missing"))
    source = url or imagenet_weights_url(name)
    raise WeightsNotFoundError(_missing_message(name, path, source, "the file is missing"))


def build_model(
    name: str, weights: str, url: str | None = None, head: Mapping[str, Any] | None = None
) -> tuple[Classifier, WeightsInfo]:
    """A Classifier with 'none' (random), 'imagenet' / 'pretrained' (the published file in TORCH_HOME's cache:
    ensure_initial_weights downloads it first) or file-path weights; url is where the published file comes from
    (default: the publisher's); head: a learn/heads.py spec (None: the Linear head)."""
    _check_name(name)
    model = Classifier(name, head)
    if weights == "none":
        return model, WeightsInfo("none", "")
    if weights in PUBLISHED:
        path = _published_file(name, url)
        name_text = "pretrained" if foundation.is_foundation(name) else "imagenet"
        digest = foundation.checked_sha256(name, path) if foundation.is_foundation(name) else file_sha256(path)
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsNotFoundError(
                f"weights file {path} not found: train.weights must be 'imagenet', 'pretrained', 'none' "
                "or an existing weights file"
            )
        name_text, digest = str(path), file_sha256(path)
    _load_into(model, path, digest)
    info = WeightsInfo(name_text, digest)
    log.info("built %s with weights %s from %s (sha256 %s)", name, name_text, path, info.sha256)
    return model, info


def reference_backbone(model: Classifier, weights: WeightsInfo, url: str | None = None) -> None:
    """Mark model's backbone as the published file it was built from (a frozen probe backbone), so that its
    checkpoints and pickles name that file instead of holding its weights; nothing for other weights."""
    if weights.name in PUBLISHED and weights.sha256:
        model.backbone_reference = {"file": pretrained_path(model.name, url).name, "sha256": weights.sha256}


def _referenced_file(name: str, reference: Mapping[str, str]) -> tuple[Path, str]:
    """(the file a backbone reference names in TORCH_HOME's cache, its sha256); errors naming the command."""
    path = checkpoints_dir() / posixpath.basename(str(reference.get("file", "")))
    if not path.is_file():
        raise WeightsNotFoundError(
            f"the {name} backbone of this model is the published weights file {path.name}, which is not in "
            f"TORCH_HOME's cache ({path}): fetch it with `{fetch_command(name)}`"
        )
    digest = file_sha256(path)
    if digest != reference.get("sha256"):
        raise WeightsError(
            f"{path} is not the weights file this model was trained on (sha256 {digest[:16]}... instead of "
            f"{str(reference.get('sha256'))[:16]}...): fetch it again with `{fetch_command(name)}`"
        )
    return path, digest


def rebuild(
    name: str, head: Mapping[str, Any], reference: Mapping[str, str], head_state: Mapping[str, torch.Tensor]
) -> Classifier:
    """A Classifier whose backbone is the published file reference names (TORCH_HOME's cache, sha256 checked) and
    whose head has head_state: how checkpoints and pickles of probe models are read back."""
    model = Classifier(name, head)
    path, digest = _referenced_file(name, reference)
    _load_into(model, path, digest)
    model.head.load_state_dict(dict(head_state), strict=True)
    model.backbone_reference = dict(reference)
    return model.eval()


def target_layer(model: nn.Module) -> nn.Module:
    """The layer Grad-CAM explains: the last conv block (resnet layer4[-1], efficientnet features[-1], convnext
    stages[-1]), or for a vision transformer the first LayerNorm of its last block (foundation.cam_layer)."""
    if not isinstance(model, Classifier):
        raise TypeError(f"target_layer needs a pipeline_lib.learn.models.Classifier, got {type(model).__name__}")
    if foundation.is_foundation(model.name):
        return foundation.cam_layer(model.name, model.backbone)
    if model.name.startswith("resnet"):
        return model.backbone.layer4[-1]
    return model.backbone.features[-1]  # efficientnet blocks; convnext: features[-1] is the last stage


def cam_reshape(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """pytorch-grad-cam's reshape_transform for model's target layer: tokens to the patch grid (class token
    dropped) for vision transformers, None for convolutional backbones (their maps are grids already)."""
    if isinstance(model, Classifier) and foundation.is_foundation(model.name):
        return foundation.cam_reshape(model.name, model.backbone)
    return None


def cam_layer_name(model: nn.Module) -> str:
    """The layer Grad-CAM explains, in words (the report shows it)."""
    if not isinstance(model, Classifier):
        return type(model).__name__
    if foundation.is_foundation(model.name):
        return foundation.cam_layer_name(model.name)
    if model.name.startswith("resnet"):
        return "backbone.layer4[-1] (last residual block)"
    return "backbone.features[-1] (last convolutional stage)"


def library_requirements(name: str) -> list[str]:
    """pip requirement lines a logged model of name needs beyond torch and torchvision (open_clip or timm)."""
    return foundation.requirements(name) if foundation.is_foundation(name) else []


def is_probe(model: nn.Module) -> bool:
    """Whether model is a Classifier with a probe head (trained on frozen, cached features)."""
    return isinstance(model, Classifier) and heads.is_probe(model.head_spec)


def first_stage(model: nn.Module) -> nn.Module | None:
    """The first stage of the backbone (resnet layer1, efficientnet and convnext features[1]): its pooled output
    describes colour and texture, which the penultimate features of a trained classifier may no longer tell apart.
    None for a foundation backbone (its tokens have no convolutional first stage to pool)."""
    if not isinstance(model, Classifier):
        raise TypeError(f"first_stage needs a pipeline_lib.learn.models.Classifier, got {type(model).__name__}")
    if foundation.is_foundation(model.name):
        return None
    if model.name.startswith("resnet"):
        return model.backbone.layer1
    return model.backbone.features[1]


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached, contiguous CPU copy of a state dict (loadable anywhere)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def save_checkpoint(path: Path, model: Classifier, meta: dict[str, Any]) -> None:
    """Write {format, state_dict, meta} atomically; meta gets model_name, classes and head if absent.

    A model with a backbone_reference keeps only its head's weights (head.*) and the reference (meta backbone).
    """
    if not isinstance(model, Classifier):
        raise TypeError(f"save_checkpoint needs a Classifier, got {type(model).__name__}")
    full_meta = {"model_name": model.name, "classes": list(CLASSES), "head": dict(model.head_spec), **meta}
    if full_meta["model_name"] != model.name:
        raise ValueError(f"meta model_name {full_meta['model_name']!r} does not match the model ({model.name!r})")
    state = _cpu_state(model)
    if model.backbone_reference is not None:
        full_meta["backbone"] = dict(model.backbone_reference)
        state = {key: value for key, value in state.items() if not key.startswith("backbone.")}
    payload = {"format": CHECKPOINT_FORMAT, "state_dict": state, "meta": full_meta}
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
    """Rebuild the Classifier from a checkpoint; return (model in eval mode, meta). No initial weights are needed,
    except for a probe on a published backbone (meta backbone): that file must be in TORCH_HOME's cache."""
    payload = read_checkpoint(path)
    meta = dict(payload["meta"])
    name = str(meta["model_name"])
    if name not in MODEL_NAMES:
        raise CheckpointError(f"model checkpoint {path} names unknown model {name!r}")
    try:
        head = heads.check_spec(meta.get("head"))
    except ValueError as error:
        raise CheckpointError(f"model checkpoint {path}: {error}") from None
    state = payload["state_dict"]
    try:
        if isinstance(meta.get("backbone"), dict):
            prefix = "head."
            head_state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
            if len(head_state) != len(state):
                raise RuntimeError("a checkpoint naming its backbone file holds only head.* weights")
            return rebuild(name, head, meta["backbone"], head_state), meta
        model = Classifier(name, head)
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"model checkpoint {path} does not fit a {name}: {error}") from None
    return model.eval(), meta
