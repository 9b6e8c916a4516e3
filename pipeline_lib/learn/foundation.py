"""Foundation backbones of the `foundation` extra: CLIP image encoders (open_clip) and DINOv2 (timm).

Each backbone is a spec in SPECS: the library and architecture it is built from, its published weights (URL, the
file name it is kept under in TORCH_HOME's checkpoints, the sha256 it is checked against and where that sha256 was
found), its input normalisation and size, and where Grad-CAM looks. The modules are built randomly initialised and
the weights loaded from the file afterwards, so building one never downloads anything.

Loading runs no code from the file: safetensors and weights-only torch files hold tensors only; OpenAI's CLIP
files are TorchScript archives, loaded (torch.jit.load) only once the file's full sha256 equals the one OpenAI
publishes in the file's URL. open_clip and timm are imported only when a foundation backbone is used, so that the
base install (without the extra) imports and runs everything else.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import http.client
import importlib
import logging
import math
import posixpath
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import torch
from torch import nn

from pipeline_lib.core.config import FOUNDATION_MODELS, ConfigError
from pipeline_lib.core.workspace import file_sha256
from pipeline_lib.learn.weights import (
    WeightsError,
    WeightsFile,
    WeightsNotFoundError,
    announced_sha256,
    checkpoints_dir,
    download_checked,
    mismatch_message,
    name_prefix,
    not_cached_message,
    read_torch_state,
)

log = logging.getLogger(__name__)

EXTRA = "pip install 'aidetect[foundation]'"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip.constants.OPENAI_DATASET_MEAN / _STD
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_OPENAI = "https://openaipublic.azureedge.net/clip/models"
_LAION = "https://github.com/mlfoundations/open_clip/releases/download/v0.2-weights"
_HUB = "https://huggingface.co/timm"
# Where the pinned sha256 values come from (all read offline, from the installed open_clip_torch 3.3.0).
_FROM_OPENAI_URL = "OpenAI's download URL carries the full sha256 as its folder (open_clip 3.3.0 pretrained.py)"
_FROM_LAION_NAME = "the release file name carries a sha256 prefix (open_clip 3.3.0 pretrained.py)"
_NOT_PINNED = (
    "no published sha256 could be found offline for this file; the download is checked against the sha256 that "
    "Hugging Face announces for it (X-Linked-Etag), and refused when the server announces none"
)


class BackboneUnavailableError(WeightsError):
    """A foundation backbone was chosen but its library (the `foundation` extra) is not installed."""


@dataclass(frozen=True)
class WeightsSource:
    """A published weights file: URL, the name it is kept under, its sha256 (full or a prefix; "" when none is
    published), its format and where that sha256 comes from."""

    url: str
    file_name: str
    sha256: str
    format: Literal["torchscript", "torch", "safetensors"]
    hash_source: str


@dataclass(frozen=True)
class BackboneSpec:
    """How a foundation backbone is built, fed and explained.

    input_size: the one input size it takes (CLIP's position embedding is fixed), None for any multiple of patch.
    overrides: architecture settings applied when building (tests build tiny models of the same classes with it).
    """

    name: str
    library: Literal["open_clip", "timm"]
    architecture: str
    weights: WeightsSource
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_size: int | None
    patch: int
    quick_gelu: bool = False
    overrides: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""


def _openai(name: str, architecture: str, digest: str, file_name: str, patch: int, what: str) -> BackboneSpec:
    source = WeightsSource(f"{_OPENAI}/{digest}/{file_name}", file_name, digest, "torchscript", _FROM_OPENAI_URL)
    clip = BackboneSpec(name, "open_clip", architecture, source, OPENAI_MEAN, OPENAI_STD, input_size=224, patch=patch)
    return dataclasses.replace(clip, quick_gelu=True, description=what)  # OpenAI trained with QuickGELU


def _laion(name: str, architecture: str, file_name: str, patch: int, what: str) -> BackboneSpec:
    source = WeightsSource(f"{_LAION}/{file_name}", file_name, name_prefix(file_name), "torch", _FROM_LAION_NAME)
    clip = BackboneSpec(name, "open_clip", architecture, source, OPENAI_MEAN, OPENAI_STD, input_size=224, patch=patch)
    return dataclasses.replace(clip, description=what)


def _dinov2(name: str, architecture: str, what: str) -> BackboneSpec:
    url = f"{_HUB}/{architecture}.lvd142m/resolve/main/model.safetensors"
    source = WeightsSource(url, f"{architecture}.lvd142m.safetensors", "", "safetensors", _NOT_PINNED)
    return BackboneSpec(name, "timm", architecture, source, IMAGENET_MEAN, IMAGENET_STD, None, 14, description=what)


SPECS: dict[str, BackboneSpec] = {
    "clip_vit_b16": _openai(
        "clip_vit_b16", "ViT-B-16", "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f",
        "ViT-B-16.pt", 16, "CLIP ViT-B/16, OpenAI weights; 512-d image embedding",
    ),  # fmt: skip
    "clip_vit_l14": _openai(
        "clip_vit_l14", "ViT-L-14", "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836",
        "ViT-L-14.pt", 14, "CLIP ViT-L/14, OpenAI weights (Ojha et al. 2023); 768-d image embedding",
    ),  # fmt: skip
    "clip_vit_b16_laion": _laion(
        "clip_vit_b16_laion", "ViT-B-16", "vit_b_16-laion400m_e32-55e67d44.pt", 16,
        "CLIP ViT-B/16 trained by OpenCLIP on LAION-400M (32 epochs); 512-d image embedding",
    ),  # fmt: skip
    "clip_vit_l14_laion": _laion(
        "clip_vit_l14_laion", "ViT-L-14", "vit_l_14-laion400m_e32-3d133497.pt", 14,
        "CLIP ViT-L/14 trained by OpenCLIP on LAION-400M (32 epochs); 768-d image embedding",
    ),  # fmt: skip
    "dinov2_vits14": _dinov2("dinov2_vits14", "vit_small_patch14_dinov2", "DINOv2 ViT-S/14 (LVD-142M); 384-d"),
    "dinov2_vitb14": _dinov2("dinov2_vitb14", "vit_base_patch14_dinov2", "DINOv2 ViT-B/14 (LVD-142M); 768-d"),
    "dinov2_vitl14": _dinov2("dinov2_vitl14", "vit_large_patch14_dinov2", "DINOv2 ViT-L/14 (LVD-142M); 1024-d"),
}
_DISTRIBUTIONS = {"open_clip": "open-clip-torch", "timm": "timm"}


def is_foundation(name: str) -> bool:
    """Whether name is a foundation backbone (built by this module) rather than a torchvision one."""
    return name in FOUNDATION_MODELS


def spec_of(name: str) -> BackboneSpec:
    """The spec of a foundation backbone; ValueError naming the known ones."""
    if name not in SPECS:
        raise ValueError(f"{name!r} is not a foundation backbone ({', '.join(SPECS)})")
    return SPECS[name]


def library(spec: BackboneSpec) -> Any:
    """The imported library that builds spec (open_clip or timm); BackboneUnavailableError naming the extra."""
    try:
        return importlib.import_module(spec.library)
    except ImportError as error:
        raise BackboneUnavailableError(
            f"train.model {spec.name} needs {_DISTRIBUTIONS[spec.library]} ({error}): install the foundation "
            f"extra with `{EXTRA}`"
        ) from None


def check_available(name: str) -> None:
    """BackboneUnavailableError when the library of a foundation backbone is not installed (nothing for others)."""
    if is_foundation(name):
        library(spec_of(name))


def check_input_size(name: str, size: int) -> None:
    """ConfigError (a ValueError) when a backbone cannot take size x size inputs (CLIP: its fixed size; DINOv2:
    multiples of 14)."""
    if not is_foundation(name):
        return
    spec = spec_of(name)
    if spec.input_size is not None and size != spec.input_size:
        raise ConfigError(f"train.image_size must be {spec.input_size} for {name} (its position embedding is fixed)")
    if size % spec.patch:
        raise ConfigError(f"train.image_size must be a multiple of {spec.patch} for {name} (its patch size)")


def build_backbone(name: str) -> tuple[nn.Module, int]:
    """(a randomly initialised backbone mapping normalised images [N,3,H,W] to features [N, dim], dim)."""
    spec = spec_of(name)
    lib = library(spec)
    if spec.library == "open_clip":
        from open_clip.model import _build_vision_tower  # the image tower alone (no text tower to build)

        config = copy.deepcopy(lib.get_model_config(spec.architecture))
        vision = {**config["vision_cfg"], **spec.overrides.get("vision_cfg", {})}
        dim = int(spec.overrides.get("embed_dim", config["embed_dim"]))
        return _build_vision_tower(dim, vision, quick_gelu=spec.quick_gelu), dim
    overrides = dict(spec.overrides)
    model = lib.create_model(spec.architecture, pretrained=False, num_classes=0, dynamic_img_size=True, **overrides)
    return model, int(model.num_features)


# --- weights ---


def weights_path(name: str) -> Path:
    """Where the published weights of name are kept: TORCH_HOME's checkpoints/<file name of the spec>."""
    return checkpoints_dir() / spec_of(name).weights.file_name


def weights_url(name: str, url: str | None = None) -> str:
    """The URL the weights are downloaded from: url (a mirror) or the publisher's."""
    return url or spec_of(name).weights.url


def missing_message(name: str, path: Path, url: str, reason: str) -> str:
    """What to do when the weights of name are not in the cache: the file, the URL, the command."""
    return not_cached_message(
        "pretrained", name, path, url, reason, mirror_hint="; train.weights_url names a mirror"
    )


def checked_sha256(name: str, path: Path) -> str:
    """The file's sha256; WeightsError when the spec pins one it does not match (a damaged or replaced file)."""
    digest = file_sha256(path)
    pinned = spec_of(name).weights.sha256
    if pinned and not digest.startswith(pinned):
        raise WeightsError(
            f"weights file {path} is damaged or not the published one: its sha256 {digest[:16]}... does not start "
            f"with {pinned[:16]} ({spec_of(name).weights.hash_source}); delete it and fetch it again"
        )
    return digest


def expected_sha256(name: str, url: str) -> str:
    """The sha256 a download of name from url must have: pinned, else in the mirror's file name, else announced."""
    pinned = spec_of(name).weights.sha256 or name_prefix(posixpath.basename(urlsplit(url).path))
    if pinned:
        return pinned
    announced = announced_sha256(url)
    if not announced:
        raise WeightsError(
            f"{url} cannot be hash-checked: no sha256 is pinned for {name} ({spec_of(name).weights.hash_source}), "
            "the file name carries none (name-<sha256 prefix>.ext) and the server announces none; nothing was "
            "downloaded"
        )
    return announced


def fetch_weights(name: str, url: str | None = None, progress: bool = True) -> WeightsFile:
    """The published weights of name in TORCH_HOME's cache, downloaded (hash-checked) from url or the publisher's
    URL when missing. WeightsNotFoundError naming the file, URL and command when offline; WeightsError when the
    sha256 does not match (nothing is stored) or cannot be known."""
    check_available(name)
    source, path = weights_url(name, url), weights_path(name)
    if path.is_file():
        return WeightsFile(path, checked_sha256(name, path), downloaded=False)
    try:
        download_checked(source, path, expected_sha256(name, source), progress)
    except (OSError, http.client.HTTPException) as error:  # URLError, HTTPError, refused, timed out, cut off
        raise WeightsNotFoundError(missing_message(name, path, source, f"the download failed: {error}")) from None
    digest = file_sha256(path)
    log.info("downloaded the weights of %s: %s (sha256 %s)", name, path, digest)
    return WeightsFile(path, digest, downloaded=True)


def _torchscript_state(name: str, path: Path, sha256: str) -> dict[str, torch.Tensor]:
    """The state dict of a TorchScript archive, read only when it is the published file (its full sha256)."""
    pinned = spec_of(name).weights.sha256
    if spec_of(name).weights.format != "torchscript" or len(pinned) != 64 or sha256 != pinned:
        raise WeightsError(
            f"weights file {path} is a TorchScript archive: aidetect loads one only when its sha256 equals the one "
            f"published for {name} (it holds code); give a safetensors or weights-only torch file instead"
        )
    with warnings.catch_warnings():  # torch.jit is deprecated; OpenAI publishes no other format of these weights
        warnings.simplefilter("ignore", FutureWarning)
        return dict(torch.jit.load(str(path), map_location="cpu").state_dict())


def _is_torchscript(path: Path) -> bool:
    """Whether a zip-format torch file is a TorchScript archive (it holds code/ and constants.pkl)."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(entry.endswith("/constants.pkl") or entry == "constants.pkl" for entry in archive.namelist())


def read_state(name: str, path: Path, sha256: str) -> dict[str, torch.Tensor]:
    """A state dict from a weights file (safetensors, weights-only torch, or OpenAI's TorchScript archive)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path), device="cpu"))
        except Exception as error:  # safetensors raises its own error types for damaged files
            raise WeightsError(f"weights file {path} is not a readable safetensors file: {error}") from None
    if _is_torchscript(path):
        return _torchscript_state(name, path, sha256)
    return read_torch_state(path)


def backbone_state(name: str, state: Mapping[str, torch.Tensor], backbone: nn.Module) -> dict[str, torch.Tensor]:
    """The part of a published state dict that is the backbone, with the backbone's key names and dtypes.

    open_clip: the image tower's keys (visual.*, after a training wrapper's module. prefix); timm: timm's own
    checkpoint filter (position embedding resampled, an original DINOv2 file's keys mapped).
    """
    plain = {key.removeprefix("module."): value for key, value in state.items()}
    if spec_of(name).library == "open_clip":
        if any(key.startswith("visual.") for key in plain):
            plain = {key.removeprefix("visual."): value for key, value in plain.items() if key.startswith("visual.")}
    else:
        from timm.models.vision_transformer import checkpoint_filter_fn

        plain = {key: value for key, value in plain.items() if not key.startswith("head.")}
        plain = checkpoint_filter_fn(plain, backbone)
    return {key: value.float() if value.is_floating_point() else value for key, value in plain.items()}


def load_into(name: str, backbone: nn.Module, state: Mapping[str, torch.Tensor], path: Path) -> None:
    """Load a published or user state dict into backbone; WeightsError naming the keys that do not fit."""
    found = backbone_state(name, state, backbone)
    expected = backbone.state_dict()
    if set(found) != set(expected) or any(found[k].shape != expected[k].shape for k in expected):
        raise WeightsError(mismatch_message(path, expected, found))
    backbone.load_state_dict(found, strict=True)


# --- Grad-CAM on the patch grid ---


def cam_layer(name: str, backbone: nn.Module) -> nn.Module:
    """The layer Grad-CAM explains: the first LayerNorm of the last transformer block, whose output (every token)
    feeds the attention that forms the class token (the output of the block itself no longer reaches it)."""
    if spec_of(name).library == "open_clip":
        return backbone.transformer.resblocks[-1].ln_1
    return backbone.blocks[-1].norm1


def cam_layer_name(name: str) -> str:
    """The Grad-CAM layer in words, for the report."""
    where = "transformer.resblocks[-1].ln_1" if spec_of(name).library == "open_clip" else "blocks[-1].norm1"
    return f"backbone.{where} (last transformer block, before attention; class token dropped, patch grid)"


def prefix_tokens(name: str, backbone: nn.Module) -> int:
    """How many tokens come before the patches (class token, DINOv2 registers)."""
    if spec_of(name).library == "open_clip":
        return 1
    return int(getattr(backbone, "num_prefix_tokens", 1))


def tokens_to_grid(tokens: torch.Tensor, prefix: int = 1) -> torch.Tensor:
    """[N, prefix + S*S, C] tokens -> [N, C, S, S] patch grid (the prefix tokens dropped): pytorch-grad-cam's
    reshape_transform for vision transformers on square inputs."""
    patches = tokens[:, prefix:, :]
    side = math.isqrt(patches.shape[1])
    if side * side != patches.shape[1]:
        raise ValueError(f"{patches.shape[1]} patch tokens do not form a square grid (prefix {prefix})")
    return patches.reshape(patches.shape[0], side, side, patches.shape[2]).permute(0, 3, 1, 2)


def cam_reshape(name: str, backbone: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The reshape_transform for a foundation backbone's Grad-CAM layer."""
    return functools.partial(tokens_to_grid, prefix=prefix_tokens(name, backbone))


def requirements(name: str) -> list[str]:
    """pip requirement lines of the library a logged model of name needs (MLflow's pip_requirements)."""
    from importlib import metadata

    distribution = _DISTRIBUTIONS[spec_of(name).library]
    return [f"{distribution}=={metadata.version(distribution)}"]
