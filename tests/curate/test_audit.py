"""Format-shortcut audit: a planted shortcut is caught, and normalisation removes it."""

from __future__ import annotations

import io
import math

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline_lib.core.catalog import new_rows
from pipeline_lib.core.config import NormalizeConfig
from pipeline_lib.core.workspace import Workspace, atomic_write_bytes, bytes_sha256
from pipeline_lib.curate.audit import (
    FEATURE_COLUMNS,
    AuditError,
    AuditResult,
    audit_rows,
    audit_shortcuts,
    audit_verdict,
    estimate_jpeg_quality,
    file_metadata,
    libjpeg_table,
    metadata_features,
)
from pipeline_lib.learn.normalize import normalized_bytes

N_PER_CLASS = 40


def content(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Texture with an 8-pixel period whatever the size, so pixel statistics do not depend on the label."""
    base = rng.integers(0, 256, size=(height // 8 + 4, width // 8 + 4, 3), dtype=np.uint8)
    big = Image.fromarray(base).resize((base.shape[1] * 8, base.shape[0] * 8), Image.Resampling.BICUBIC)
    noisy = np.asarray(big, dtype=np.int16) + rng.integers(-12, 13, size=(big.height, big.width, 3))
    pixels = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
    return pixels.crop((8, 8, 8 + width, 8 + height))  # away from the resize's flatter border


def encode(image: Image.Image, fmt: str, exif: bool = False, quality: int = 85) -> bytes:
    buffer = io.BytesIO()
    if fmt == "JPEG":
        extra = {}
        if exif:
            tags = Image.Exif()
            tags[271] = "Canon"  # Make
            tags[272] = "EOS 5D"  # Model
            extra["exif"] = tags.tobytes()
        image.save(buffer, "JPEG", quality=quality, **extra)
    else:
        image.save(buffer, fmt)
    return buffer.getvalue()


def planted_images(seed: int = 0) -> list[tuple[str, Image.Image, bytes]]:
    """AI: PNG, all 64x64, no EXIF. Real: camera-like JPEG with EXIF, 64 x 64..128 in either orientation."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(N_PER_CLASS):
        image = content(rng, 64, 64)
        out.append(("ai", image, encode(image, "PNG")))
    for _ in range(N_PER_CLASS):
        long_side = 8 * int(rng.integers(8, 17))  # multiples of 8: the same resize ratio on both axes
        width, height = (long_side, 64) if rng.random() < 0.5 else (64, long_side)
        image = content(rng, width, height)
        out.append(("real", image, encode(image, "JPEG", exif=True, quality=int(rng.integers(80, 96)))))
    return out


def store(workspace: Workspace, items: list[tuple[str, bytes]]) -> pd.DataFrame:
    records = []
    for index, (label, data) in enumerate(items):
        sha = bytes_sha256(data)
        target = workspace.store_path(sha, "img")
        atomic_write_bytes(target, data)
        records.append(
            {"sha256": sha, "path": workspace.relative(target), "label": label, "group": f"g{index}", "status": "ok"}
        )
    return new_rows(records)


def test_planted_shortcut_is_caught_and_normalisation_brings_it_to_chance(tmp_path) -> None:
    images = planted_images()
    raw_ws = Workspace.create(tmp_path / "raw")
    raw = store(raw_ws, [(label, data) for label, _, data in images])
    result = audit_rows(raw_ws, raw, seed=0)
    assert result.n == 2 * N_PER_CLASS and result.folds == 5
    assert result.roc_auc > 0.95, result
    assert result.top_features and result.top_features[0][1] > 0
    level, message = audit_verdict(result, warn_above=0.8, strict=False)
    assert level == "warn" and "preprocess.normalize" in message
    assert audit_verdict(result, warn_above=0.8, strict=True)[0] == "fail"

    policy = NormalizeConfig(mode="jpeg", quality=90, resize_shorter=48, crop_square=True)
    norm_ws = Workspace.create(tmp_path / "norm")
    normalized = store(norm_ws, [(label, normalized_bytes(image, policy)) for label, image, _ in images])
    features = metadata_features(norm_ws, normalized)
    assert (features["exif_present"] == 0).all() and (features["format_jpeg"] == 1).all()
    assert (features["width"] == 48).all() and (features["jpeg_quality"] == 90).all()
    after = audit_shortcuts(features, normalized["label"], seed=0)
    assert after.roc_auc < 0.7, after
    assert audit_verdict(after, warn_above=0.8, strict=True)[0] == "ok"


@pytest.mark.parametrize("quality", [10, 30, 50, 75, 90, 95, 100])
def test_jpeg_quality_estimate_recovers_the_encoder_setting(quality: int) -> None:
    data = encode(Image.new("RGB", (16, 16), (120, 40, 200)), "JPEG", quality=quality)
    assert file_metadata(data)["jpeg_quality"] == quality
    assert estimate_jpeg_quality(libjpeg_table(quality)) == quality


def test_file_metadata_of_png_webp_and_exif_jpeg() -> None:
    image = Image.new("RGB", (40, 20), (1, 2, 3))
    png = file_metadata(encode(image, "PNG"))
    assert png["format_png"] == 1 and png["format_jpeg"] == 0 and png["jpeg_quality"] == -1
    assert png["exif_present"] == 0 and png["aspect_ratio"] == 2.0 and png["width"] == 40 and png["height"] == 20
    assert png["bytes_per_pixel"] == pytest.approx(len(encode(image, "PNG")) / 800)
    assert file_metadata(encode(image, "WEBP"))["format_webp"] == 1
    assert file_metadata(encode(image, "GIF"))["format_other"] == 1
    assert file_metadata(encode(image, "JPEG", exif=True))["exif_present"] == 1
    with pytest.raises(AuditError, match="cannot read image header"):
        file_metadata(b"not an image")


def test_metadata_features_use_usable_rows_and_name_missing_files(workspace: Workspace) -> None:
    catalog = store(workspace, [("ai", encode(Image.new("RGB", (8, 8)), "PNG")), ("real", b"x" * 10)])
    catalog.loc[1, "status"] = "invalid:decode"
    features = metadata_features(workspace, catalog)
    assert list(features.columns) == list(FEATURE_COLUMNS) and list(features.index) == [catalog["sha256"][0]]
    (workspace.root / catalog["path"][0]).unlink()
    with pytest.raises(AuditError, match="stored file of .* is missing"):
        metadata_features(workspace, catalog)


def test_too_few_images_per_label_gives_nan_and_a_warning() -> None:
    features = pd.DataFrame([[0.0] * len(FEATURE_COLUMNS)] * 3, columns=list(FEATURE_COLUMNS))
    result = audit_shortcuts(features, ["ai", "ai", "real"])
    assert math.isnan(result.roc_auc) and "need >= 2" in result.note
    assert audit_verdict(result, 0.8, strict=True)[0] == "warn"
    with pytest.raises(AuditError, match="labels must be one of"):
        audit_shortcuts(features, ["ai", "fake", "real"])
    with pytest.raises(AuditError, match="differ in length"):
        audit_shortcuts(features, ["ai", "real"])


def test_verdict_threshold_and_metrics() -> None:
    result = AuditResult(0.8, [("width", 0.7)], 10, {"real": 5, "ai": 5}, 5)
    assert audit_verdict(result, 0.8, strict=True)[0] == "ok"
    assert audit_verdict(result, 0.79, strict=False)[0] == "warn"
    assert result.metrics() == {
        "audit.roc_auc": 0.8,
        "audit.n": 10.0,
        "audit.folds": 5.0,
        "audit.importance.width": 0.7,
    }
    with pytest.raises(ValueError, match="warn_above"):
        audit_verdict(result, 1.5, strict=False)


def test_verdict_after_normalisation_gives_other_advice():
    from pipeline_lib.curate.audit import AuditResult

    result = AuditResult(roc_auc=0.99, top_features=[("bytes_per_pixel", 1.0)], n=40, n_per_label={}, folds=5, note="")
    assert "normalize.mode=jpeg" in audit_verdict(result, 0.8, strict=False)[1]
    level, message = audit_verdict(result, 0.8, strict=False, normalized=True)
    assert level == "warn" and "even after re-encoding" in message and "mode=jpeg" not in message
