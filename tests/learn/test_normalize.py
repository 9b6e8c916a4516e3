"""Normalisation: metadata stripped, resize policy, fixed/random JPEG quality; robustness variants on files."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline_lib.core.config import ConfigError, NormalizeConfig
from pipeline_lib.core.config_loader import build_config
from pipeline_lib.curate.audit import file_metadata
from pipeline_lib.learn.normalize import (
    ROBUSTNESS_VARIANTS,
    degrade_file,
    downscale_file,
    image_rng,
    jpeg_file,
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


def _file(image: Image.Image, fmt: str = "JPEG", **save: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    return buffer.getvalue()


def test_robustness_variants_write_degraded_files_at_full_resolution() -> None:
    noisy = np.asarray(photo(120, 90, seed=2)).astype(np.int16)
    noisy = np.clip(noisy + np.random.default_rng(3).integers(-30, 31, noisy.shape), 0, 255).astype(np.uint8)
    original = _file(Image.fromarray(noisy), "PNG")
    assert set(ROBUSTNESS_VARIANTS) == {"jpeg95", "jpeg75", "jpeg50", "downscale50"}
    errors = {}
    for name in ROBUSTNESS_VARIANTS:
        data = degrade_file(original, name)
        meta = file_metadata(data)
        with Image.open(io.BytesIO(data)) as degraded:
            pixels = np.asarray(degraded.convert("RGB").resize((120, 90), Image.Resampling.BILINEAR))
            size = degraded.size
        if name.startswith("jpeg"):
            assert meta["format_jpeg"] == 1 and meta["jpeg_quality"] == int(name.removeprefix("jpeg")), (name, meta)
            assert size == (120, 90), f"{name} must keep the file's resolution, got {size}"
        else:
            assert meta["format_png"] == 1 and size == (60, 45), f"downscale50 must halve the file, got {size}"
        errors[name] = np.abs(pixels.astype(float) - noisy.astype(float)).mean()
    assert 0 < errors["jpeg95"] < errors["jpeg75"] < errors["jpeg50"], errors


def test_degrading_a_jpeg_file_changes_its_bytes_at_quality_75() -> None:
    exif = Image.Exif()
    exif[274] = 6  # rotate 90 degrees on display
    original = _file(photo(80, 60), "JPEG", quality=95, exif=exif.tobytes())
    degraded = degrade_file(original, "jpeg75")
    assert degraded != original
    with Image.open(io.BytesIO(degraded)) as image:
        assert image.size == (60, 80), "EXIF orientation is applied before re-encoding (as training decodes)"
        assert not image.getexif()
    assert file_metadata(degraded)["jpeg_quality"] == 75


def test_variant_errors() -> None:
    with pytest.raises(ValueError, match="unknown robustness variant"):
        degrade_file(_file(photo()), "blur")
    with pytest.raises(ValueError, match="1..100"):
        jpeg_file(0)
    with pytest.raises(ValueError, match="downscale factor"):
        downscale_file(1.5)
