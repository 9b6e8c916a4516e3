"""Normalisation: metadata stripped, resize policy, fixed/random JPEG quality; robustness variants on tensors."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline_lib.audit import file_metadata
from pipeline_lib.config import ConfigError, NormalizeConfig, build_config
from pipeline_lib.normalize import (
    ROBUSTNESS_VARIANTS,
    apply_variant,
    image_rng,
    normalize_image,
    normalized_bytes,
    pick_quality,
    policy_key,
    resize_shorter,
    strip_metadata,
)


def photo(width: int = 60, height: int = 40, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(5, 5, 3), dtype=np.uint8)
    return Image.fromarray(base).resize((width, height), Image.Resampling.BICUBIC)


def with_exif(image: Image.Image, orientation: int = 1) -> Image.Image:
    exif = Image.Exif()
    exif[271] = "Canon"
    exif[274] = orientation
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95, exif=exif.tobytes())
    return Image.open(io.BytesIO(buffer.getvalue()))


def test_jpeg_policy_strips_metadata_resizes_and_uses_the_fixed_quality() -> None:
    source = with_exif(photo(90, 60))
    assert len(source.getexif()) > 0
    policy = NormalizeConfig(mode="jpeg", quality=80, resize_shorter=30)
    data = normalized_bytes(source, policy)
    meta = file_metadata(data)
    assert meta["exif_present"] == 0 and meta["format_jpeg"] == 1 and meta["jpeg_quality"] == 80
    assert (meta["width"], meta["height"]) == (45, 30)
    out = normalize_image(source, policy)
    assert out.mode == "RGB" and out.size == (45, 30) and not out.getexif() and "exif" not in out.info
    assert np.array_equal(np.asarray(out), np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))


def test_exif_orientation_is_applied_before_it_is_stripped() -> None:
    rotated = with_exif(photo(60, 40), orientation=6)  # rotate 90 degrees on display
    assert strip_metadata(rotated).size == (40, 60)


def test_crop_square_and_png_with_alpha() -> None:
    rgba = photo(50, 80).convert("RGBA")
    out = normalize_image(rgba, NormalizeConfig(mode="jpeg", resize_shorter=32, crop_square=True))
    assert out.size == (32, 32) and out.mode == "RGB"
    assert resize_shorter(photo(50, 80), 25).size == (25, 40)
    with pytest.raises(ValueError, match="positive integer"):
        resize_shorter(photo(), 0)


def test_mode_none_keeps_pixels_and_has_no_bytes() -> None:
    image = photo()
    out = normalize_image(image, NormalizeConfig())
    assert np.array_equal(np.asarray(out), np.asarray(image))
    with pytest.raises(ValueError, match="mode is 'none'"):
        normalized_bytes(image, NormalizeConfig())
    with pytest.raises(TypeError, match="PIL.Image"):
        normalize_image(np.zeros((4, 4, 3)), NormalizeConfig())  # type: ignore[arg-type]


def test_random_quality_range_is_reproducible_per_image() -> None:
    policy = NormalizeConfig(mode="jpeg", quality_min=60, quality_max=70)
    qualities = {pick_quality(policy, image_rng(f"{i:064x}")) for i in range(50)}
    assert qualities <= set(range(60, 71)) and len(qualities) > 3
    assert pick_quality(policy, image_rng("ab" * 32, seed=1)) == pick_quality(policy, image_rng("ab" * 32, seed=1))
    quality = file_metadata(normalized_bytes(photo(), policy, image_rng("cd" * 32)))["jpeg_quality"]
    assert 60 <= quality <= 70
    with pytest.raises(ValueError, match="pass an rng"):
        pick_quality(policy, None)


def test_policy_config_validation_and_keys() -> None:
    config = build_config({"preprocess": {"normalize": {"mode": "jpeg", "quality": 85, "resize_shorter": 256}}})
    assert policy_key(config.preprocess.normalize) == "jpeg-q85-r256"
    assert policy_key(NormalizeConfig()) == "none"
    assert policy_key(NormalizeConfig(mode="jpeg", quality_min=50, quality_max=90)) == "jpeg-q50to90"
    with pytest.raises(ConfigError, match="set together"):
        build_config({"preprocess": {"normalize": {"quality_min": 50}}})
    with pytest.raises(ConfigError, match="quality_min"):
        build_config({"preprocess": {"normalize": {"quality_min": 90, "quality_max": 50}}})


def _tensor(n: int = 2, size: int = 32) -> torch.Tensor:
    rng = np.random.default_rng(3)
    arrays = [np.asarray(photo(size, size, seed=s)) for s in range(n)]
    noisy = np.clip(np.stack(arrays).astype(np.int16) + rng.integers(-30, 31, (n, size, size, 3)), 0, 255)
    return torch.from_numpy(noisy.astype(np.uint8)).permute(0, 3, 1, 2).contiguous()


def test_robustness_variants_keep_shape_and_degrade_in_order() -> None:
    images = _tensor()
    assert set(ROBUSTNESS_VARIANTS) == {"jpeg95", "jpeg75", "jpeg50", "downscale50"}
    errors = {}
    for name in ROBUSTNESS_VARIANTS:
        out = apply_variant(images, name)
        assert out.shape == images.shape and out.dtype == torch.uint8
        errors[name] = (out.float() - images.float()).abs().mean().item()
    assert 0 < errors["jpeg95"] < errors["jpeg75"] < errors["jpeg50"]
    assert errors["downscale50"] > errors["jpeg95"]
    single = apply_variant(images[0], "jpeg75")
    assert single.shape == images[0].shape and torch.equal(single, apply_variant(images, "jpeg75")[0])


def test_downscale_removes_a_one_pixel_checkerboard() -> None:
    board = (np.indices((16, 16)).sum(axis=0) % 2 * 255).astype(np.uint8)
    images = torch.from_numpy(np.stack([board] * 3))
    out = apply_variant(images, "downscale50").float()
    assert out.std().item() < 0.25 * images.float().std().item()


def test_variant_errors() -> None:
    with pytest.raises(ValueError, match="unknown robustness variant"):
        apply_variant(_tensor(), "blur")
    with pytest.raises(ValueError, match="uint8"):
        apply_variant(_tensor().float(), "jpeg95")
    with pytest.raises(ValueError, match="shape"):
        apply_variant(torch.zeros((1, 4, 8, 8), dtype=torch.uint8), "jpeg95")
