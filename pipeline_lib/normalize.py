"""Normalisation against format shortcuts: re-encode both classes the same way, and robustness variants.

`normalize_image` decodes to plain RGB pixels (dropping EXIF, ICC, text chunks), optionally resizes the shorter side
(and centre-crops to a square), then encodes as JPEG at a fixed or random quality in memory and decodes it again,
so that real photos and generator output reach the model with the same container, quality and metadata.

`ROBUSTNESS_VARIANTS` maps a name to a function on uint8 tensors ([3,H,W] or [N,3,H,W]) that degrades the images
the way the evaluation of the test split under JPEG 95/75/50 and 50% downscaling needs; the size is kept.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

from pipeline_lib.config import NormalizeConfig
from pipeline_lib.validate import to_rgb

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# torch is imported where the tensor functions run: the decode workers of preprocess import this module, and a
# worker that imported torch would start seconds later.
TensorFn = Callable[["torch.Tensor"], "torch.Tensor"]


def _check_image(image: object) -> None:
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL.Image.Image, got {type(image).__name__}")


def strip_metadata(image: Image.Image) -> Image.Image:
    """A new RGB image holding only the pixels, EXIF orientation applied (no EXIF, ICC, text chunks, format info)."""
    _check_image(image)
    rgb = to_rgb(ImageOps.exif_transpose(image) or image)
    clean = Image.new("RGB", rgb.size)
    clean.paste(rgb)
    return clean


def resize_shorter(image: Image.Image, shorter: int, crop_square: bool = False) -> Image.Image:
    """Resize (bicubic, antialiased) so the shorter side is `shorter`; optionally centre-crop to a square."""
    if not isinstance(shorter, int) or isinstance(shorter, bool) or shorter < 1:
        raise ValueError(f"resize_shorter must be a positive integer, got {shorter!r}")
    width, height = image.size
    scale = shorter / min(width, height)
    size = (max(shorter, round(width * scale)), max(shorter, round(height * scale)))
    if size != image.size:
        image = image.resize(size, Image.Resampling.BICUBIC)
    if crop_square:
        left, top = (size[0] - shorter) // 2, (size[1] - shorter) // 2
        image = image.crop((left, top, left + shorter, top + shorter))
    return image


def pick_quality(policy: NormalizeConfig, rng: np.random.Generator | None) -> int:
    """The policy's fixed quality, or a random one in [quality_min, quality_max] (rng required then)."""
    if policy.quality_min is None or policy.quality_max is None:
        return policy.quality
    if rng is None:
        raise ValueError("preprocess.normalize uses a random quality range: pass an rng (see image_rng)")
    return int(rng.integers(policy.quality_min, policy.quality_max + 1))


def image_rng(sha256: str, seed: int = 0) -> np.random.Generator:
    """A per-image generator derived from its hash and a seed, so random qualities are reproducible and cacheable."""
    if not isinstance(sha256, str) or not sha256:
        raise ValueError(f"sha256 must be a non-empty string, got {sha256!r}")
    digest = hashlib.sha256(f"{seed}:{sha256}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "big"))


def jpeg_roundtrip(image: Image.Image, quality: int) -> tuple[Image.Image, bytes]:
    """Encode RGB image as baseline JPEG (4:2:0) at quality in memory; return (decoded image, encoded bytes)."""
    if not isinstance(quality, int) or isinstance(quality, bool) or not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be an integer in 1..100, got {quality!r}")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, subsampling=2, optimize=False)
    data = buffer.getvalue()
    with Image.open(io.BytesIO(data)) as decoded:
        decoded.load()
        return decoded.convert("RGB"), data


def _prepared(image: Image.Image, policy: NormalizeConfig) -> Image.Image:
    clean = strip_metadata(image)
    if policy.resize_shorter is not None:
        clean = resize_shorter(clean, policy.resize_shorter, policy.crop_square)
    return clean


def normalized_bytes(image: Image.Image, policy: NormalizeConfig, rng: np.random.Generator | None = None) -> bytes:
    """The JPEG bytes normalize_image would decode (for audits of the normalised files); mode 'none' is an error."""
    if policy.mode != "jpeg":
        raise ValueError(f"preprocess.normalize.mode is {policy.mode!r}: there is no re-encoding to return")
    _, data = jpeg_roundtrip(_prepared(image, policy), pick_quality(policy, rng))
    return data


def normalize_image(image: Image.Image, policy: NormalizeConfig, rng: np.random.Generator | None = None) -> Image.Image:
    """Re-encode per policy: 'none' returns plain RGB pixels; 'jpeg' strips, resizes and JPEG round-trips."""
    _check_image(image)
    if policy.mode == "none":
        return to_rgb(image)
    decoded, _ = jpeg_roundtrip(_prepared(image, policy), pick_quality(policy, rng))
    return decoded


def policy_key(policy: NormalizeConfig) -> str:
    """A short stable name for a policy (for cache folders and run tags), e.g. 'none' or 'jpeg-q90-r256-sq'."""
    if policy.mode == "none":
        return "none"
    if policy.quality_min is not None:
        parts = [f"jpeg-q{policy.quality_min}to{policy.quality_max}"]
    else:
        parts = [f"jpeg-q{policy.quality}"]
    if policy.resize_shorter is not None:
        parts.append(f"r{policy.resize_shorter}")
        if policy.crop_square:
            parts.append("sq")
    return "-".join(parts)


# ---------------------------------------------------------------------------------------------------------------
# Robustness variants on uint8 tensors


def _check_tensor(images: torch.Tensor) -> None:
    import torch

    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
        kind = images.dtype if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a uint8 torch.Tensor [3,H,W] or [N,3,H,W], got {kind}")
    if images.ndim not in (3, 4) or images.shape[-3] != 3:
        raise ValueError(f"images must have shape [3,H,W] or [N,3,H,W], got {list(images.shape)}")


def _per_image(transform: Callable[[Image.Image], Image.Image]) -> TensorFn:
    """Lift a PIL transform to uint8 CHW / NCHW tensors (CPU result, same shape)."""

    def apply(images: torch.Tensor) -> torch.Tensor:
        import torch

        _check_tensor(images)
        batch = images.unsqueeze(0) if images.ndim == 3 else images
        out = []
        for chw in batch.detach().cpu():
            pil = Image.fromarray(np.ascontiguousarray(chw.permute(1, 2, 0).numpy()), mode="RGB")
            result = np.asarray(transform(pil).convert("RGB"), dtype=np.uint8)
            out.append(torch.from_numpy(result.copy()).permute(2, 0, 1))
        stacked = torch.stack(out) if out else batch.detach().cpu().clone()
        return stacked[0] if images.ndim == 3 else stacked

    return apply


def jpeg_variant(quality: int) -> TensorFn:
    """Tensor function: JPEG-encode each image at quality and decode it back."""
    return _per_image(lambda image: jpeg_roundtrip(image, quality)[0])


def downscale_variant(factor: float) -> TensorFn:
    """Tensor function: downscale each image by factor (bicubic) and scale it back up to its size (bilinear)."""
    if not 0 < factor < 1:
        raise ValueError(f"downscale factor must be in (0, 1), got {factor}")

    def transform(image: Image.Image) -> Image.Image:
        small = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
        return image.resize(small, Image.Resampling.BICUBIC).resize(image.size, Image.Resampling.BILINEAR)

    return _per_image(transform)


ROBUSTNESS_VARIANTS: dict[str, TensorFn] = {
    "jpeg95": jpeg_variant(95),
    "jpeg75": jpeg_variant(75),
    "jpeg50": jpeg_variant(50),
    "downscale50": downscale_variant(0.5),
}
robustness_variants = ROBUSTNESS_VARIANTS  # the name used in the issue


def apply_variant(images: torch.Tensor, name: str) -> torch.Tensor:
    """Apply the named robustness variant; ValueError listing the known names otherwise."""
    if name not in ROBUSTNESS_VARIANTS:
        raise ValueError(f"unknown robustness variant {name!r}; known: {', '.join(ROBUSTNESS_VARIANTS)}")
    return ROBUSTNESS_VARIANTS[name](images)
