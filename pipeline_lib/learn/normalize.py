"""Normalisation against format shortcuts: re-encode both classes the same way, and robustness variants.

`normalize_image` decodes to plain RGB pixels (dropping EXIF, ICC, text chunks), optionally resizes the shorter side
(and centre-crops to a square), then encodes as JPEG at a fixed or random quality in memory and decodes it again,
so that real photos and generator output reach the model with the same container, quality and metadata.

`ROBUSTNESS_VARIANTS` maps a name to a function that writes a degraded copy of an image file the way a user would
(re-encoded as JPEG 95/75/50, or downscaled to 50%): the robustness evaluation degrades the original test files with
`degrade_file`, then decodes them with the same preprocessing as training (preprocess.degraded_tensors).
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageOps

from pipeline_lib.acquire.validate import to_rgb
from pipeline_lib.core.config import NormalizeConfig

# No torch here: the decode workers of preprocess import this module, and a worker that imported torch would start
# seconds later.
log = logging.getLogger(__name__)


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
# Robustness variants: degraded files, as a user would make them

FileFn = Callable[[Image.Image], bytes]  # decoded original (RGB, EXIF orientation applied) -> bytes of the new file
ROBUSTNESS_DESCRIPTION = "re-encoded as JPEG at quality 95, 75 and 50; downscaled to 50% and saved as PNG"


def jpeg_file(quality: int) -> FileFn:
    """File function: the whole image re-encoded as a baseline JPEG (4:2:0) at quality."""
    if not isinstance(quality, int) or isinstance(quality, bool) or not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be an integer in 1..100, got {quality!r}")
    return lambda image: jpeg_roundtrip(image, quality)[1]


def downscale_file(factor: float) -> FileFn:
    """File function: the image downscaled by factor (bicubic) and saved as PNG (lossless: only pixels are lost)."""
    if not 0 < factor < 1:
        raise ValueError(f"downscale factor must be in (0, 1), got {factor}")

    def degrade(image: Image.Image) -> bytes:
        small = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
        buffer = io.BytesIO()
        image.resize(small, Image.Resampling.BICUBIC).save(buffer, format="PNG", compress_level=1)
        return buffer.getvalue()

    return degrade


ROBUSTNESS_VARIANTS: dict[str, FileFn] = {
    "jpeg95": jpeg_file(95),
    "jpeg75": jpeg_file(75),
    "jpeg50": jpeg_file(50),
    "downscale50": downscale_file(0.5),
}
robustness_variants = ROBUSTNESS_VARIANTS  # the name used in the issue


def degrade_file(data: bytes, name: str) -> bytes:
    """The bytes of an image file degraded by the named variant: decoded like training decodes it (EXIF orientation
    applied, RGB, metadata dropped), then written again (a JPEG at that quality, or a smaller PNG)."""
    if name not in ROBUSTNESS_VARIANTS:
        raise ValueError(f"unknown robustness variant {name!r}; known: {', '.join(ROBUSTNESS_VARIANTS)}")
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return ROBUSTNESS_VARIANTS[name](strip_metadata(image))
