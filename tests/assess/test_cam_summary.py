"""CAM attention summary: border share on synthetic maps; text-like regions from an edge-density heuristic."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image, ImageDraw

from pipeline_lib.assess.cam_summary import border_mask, border_shares, cam_attention_summary, text_mask, text_share


def centre_blob(size: int = 40) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    return np.exp(-((yy - size / 2) ** 2 + (xx - size / 2) ** 2) / (2 * (size / 10) ** 2))


def frame_map(size: int = 40) -> np.ndarray:
    cam = np.zeros((size, size))
    cam[:2, :] = cam[-2:, :] = cam[:, :2] = cam[:, -2:] = 1.0
    return cam


def test_border_share_of_uniform_centre_and_frame_maps() -> None:
    cams = np.stack([np.ones((40, 40)), centre_blob(), frame_map(), np.zeros((40, 40))])
    shares = border_shares(cams, border_fraction=0.1)
    assert shares[0] == pytest.approx(1 - 0.8**2)  # uniform: the band's area share, 0.36
    assert shares[1] < 0.01 and shares[2] == 1.0 and math.isnan(shares[3])
    summary = cam_attention_summary(cams, border_fraction=0.1, flag_above=0.5)
    assert summary["n"] == 4 and summary["n_border_flagged"] == 1 and summary["flagged_border"] == [2]
    assert summary["border_share_mean"] == pytest.approx((0.36 + shares[1] + 1.0) / 3)
    assert border_mask(10, 20, 0.1).sum() == 10 * 20 - 8 * 16


def test_cam_input_errors() -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        border_shares(np.full((1, 4, 4), 2.0))
    with pytest.raises(ValueError, match="shaped"):
        border_shares(np.zeros((1, 1, 4, 4)))
    with pytest.raises(ValueError, match="border_fraction"):
        border_shares(np.zeros((1, 4, 4)), border_fraction=0.6)


def text_image(size: int = 128) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """A smooth gradient with a line of text (a watermark) near the bottom; returns the image and text box."""
    ramp = np.linspace(60, 200, size, dtype=np.float64)
    grey = np.tile(ramp, (size, 1)).astype(np.uint8)
    image = Image.fromarray(np.stack([grey] * 3, axis=2))
    draw = ImageDraw.Draw(image)
    box = (10, 100, 118, 112)
    draw.text((box[0], box[1]), "WATERMARK 2024 stock", fill=(0, 0, 0))
    return np.asarray(image), box


def test_text_mask_marks_the_text_line_and_not_the_smooth_background() -> None:
    image, (left, top, right, bottom) = text_image()
    mask = text_mask(image)
    inside = mask[top:bottom, left:right].mean()
    outside = mask[: top - 10].mean()
    assert inside > 0.5 and outside == 0.0
    assert not text_mask(np.full((32, 32, 3), 128, dtype=np.uint8)).any()
    with pytest.raises(ValueError, match="uint8"):
        text_mask(np.zeros((8, 8)))


def test_text_share_and_summary_with_masks() -> None:
    image, (left, top, right, bottom) = text_image()
    mask = text_mask(image)
    on_text = np.zeros((128, 128))
    on_text[top:bottom, left:right] = 1.0
    small_centre = centre_blob(32)  # CAM at a lower resolution than the image: the mask is resized
    shares = text_share(np.stack([on_text, np.asarray(Image.fromarray(small_centre).resize((128, 128)))]), [mask, mask])
    assert shares[0] > 0.5 and shares[1] < 0.1
    summary = cam_attention_summary(small_centre[None], text_masks=[mask])
    assert summary["n_text_flagged"] == 0 and summary["text_share_mean"] < 0.1
    with pytest.raises(ValueError, match="text masks"):
        text_share(np.zeros((2, 8, 8)), [np.zeros((8, 8), dtype=bool)])
