"""Generated photo-like images shared by the benchmarks (upsampled colour field, a few shapes, pixel noise)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


def photo_like_image(seed: int, width: int, height: int, max_shape: int) -> Image.Image:
    """A deterministic RGB image of width x height with 8 ellipses/rectangles up to max_shape pixels across."""
    rng = np.random.default_rng(seed)
    field = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    image = Image.fromarray(field).resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(8):
        x0, y0 = int(rng.integers(0, width - 200)), int(rng.integers(0, height - 200))
        x1, y1 = x0 + int(rng.integers(50, max_shape)), y0 + int(rng.integers(50, max_shape))
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    pixels = np.asarray(image, dtype=np.int16) + rng.normal(0, 8, size=(height, width, 3)).astype(np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
