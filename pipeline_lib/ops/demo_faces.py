"""SYNTHETIC drawn faces for the demo (not real people): each class with its tells, encoded as its files would be.

The "real" class imitates camera photos (sensor noise, JPEG artefacts, asymmetric features, sharp cluttered
backgrounds); the "ai" class imitates generated portraits (noise-free smooth skin, mirror-symmetric features,
strongly blurred backgrounds, PNG). Every image is drawn with PIL/numpy from a seed: nothing is downloaded.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SUPERSAMPLE = 2
Colour = tuple[int, int, int]


@dataclass(frozen=True)
class _Person:
    """The fixed look of one synthetic person."""

    skin: Colour
    hair: Colour
    iris: Colour
    lips: Colour
    head_w: float
    head_h: float
    eye_dx: float
    eye_y: float
    eye_r: float
    nose_len: float
    mouth_w: float
    mouth_y: float
    hair_style: int


def _colour(rng: np.random.Generator, low: int, high: int) -> Colour:
    r, g, b = (int(v) for v in rng.integers(low, high, size=3))
    return (r, g, b)


def _make_person(rng: np.random.Generator) -> _Person:
    """Random but fixed facial proportions and colours."""
    base = int(rng.integers(90, 230))
    skin = (min(255, base + 25), int(base * rng.uniform(0.75, 0.9)), int(base * rng.uniform(0.55, 0.75)))
    return _Person(
        skin=skin,
        hair=_colour(rng, 10, 120),
        iris=_colour(rng, 20, 160),
        lips=(int(rng.integers(140, 220)), int(rng.integers(40, 90)), int(rng.integers(50, 100))),
        head_w=float(rng.uniform(0.25, 0.32)),
        head_h=float(rng.uniform(0.32, 0.39)),
        eye_dx=float(rng.uniform(0.09, 0.13)),
        eye_y=float(rng.uniform(0.04, 0.09)),
        eye_r=float(rng.uniform(0.028, 0.042)),
        nose_len=float(rng.uniform(0.07, 0.11)),
        mouth_w=float(rng.uniform(0.06, 0.1)),
        mouth_y=float(rng.uniform(0.14, 0.19)),
        hair_style=int(rng.integers(0, 3)),
    )


def _jitter(colour: Colour, rng: np.random.Generator, amount: int) -> Colour:
    r, g, b = (int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in colour)
    return (r, g, b)


def _draw_eye(draw: ImageDraw.ImageDraw, x: float, y: float, r: float, iris: Colour) -> None:
    draw.ellipse((x - 1.6 * r, y - r, x + 1.6 * r, y + r), fill=(245, 245, 240, 255))
    draw.ellipse((x - 0.8 * r, y - 0.8 * r, x + 0.8 * r, y + 0.8 * r), fill=(*iris, 255))
    draw.ellipse((x - 0.35 * r, y - 0.35 * r, x + 0.35 * r, y + 0.35 * r), fill=(10, 10, 10, 255))


def _draw_face(size: int, person: _Person, rng: np.random.Generator, asymmetry: float) -> Image.Image:
    """A centred RGBA face; asymmetry (fraction of size) offsets features randomly (0 = symmetric layout)."""
    layer = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    cx, cy = size / 2, size * 0.54
    hw, hh = person.head_w * size, person.head_h * size
    skin, hair = _jitter(person.skin, rng, 8), _jitter(person.hair, rng, 8)

    def off() -> float:
        return float(rng.normal(0, asymmetry * size)) if asymmetry else 0.0

    draw.ellipse(
        (cx - hw * 1.12, cy - hh * 1.18, cx + hw * 1.12, cy + hh * (0.2 + 0.3 * person.hair_style)), fill=(*hair, 255)
    )
    draw.ellipse((cx - hw, cy - hh, cx + hw, cy + hh), fill=(*skin, 255))
    if person.hair_style != 1:
        draw.chord((cx - hw, cy - hh * 1.1, cx + hw, cy - hh * 0.2), 180, 360, fill=(*hair, 255))
    eye_y = cy - person.eye_y * size
    eye_r = person.eye_r * size
    for side in (-1, 1):
        r = eye_r * (1 + (rng.uniform(-0.25, 0.25) if asymmetry else 0.0))
        _draw_eye(draw, cx + side * person.eye_dx * size + off(), eye_y + off(), r, person.iris)
    nose_x = cx + off()
    nose_bottom = cy + person.nose_len * size
    shade = tuple(int(c * 0.75) for c in skin)
    draw.polygon(
        [(nose_x, cy - 0.01 * size), (nose_x - 0.03 * size, nose_bottom), (nose_x + 0.03 * size, nose_bottom)],
        fill=(*shade, 255),
    )
    mouth_y = cy + person.mouth_y * size
    half = person.mouth_w * size
    left = (cx - half + off(), mouth_y + off())
    right = (cx + half + off(), mouth_y + off())
    mid = ((left[0] + right[0]) / 2, max(left[1], right[1]) + 0.025 * size)
    draw.polygon([left, mid, right], fill=(*person.lips, 255))
    return layer


def _mirror(layer: Image.Image) -> Image.Image:
    """Make a centred layer exactly mirror-symmetric (left half copied onto the right)."""
    array = np.asarray(layer).copy()
    half = array.shape[1] // 2
    array[:, array.shape[1] - half :] = array[:, :half][:, ::-1]
    return Image.fromarray(array, "RGBA")


def _pose(layer: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Random scale, shift and small rotation of a face layer (same canvas size)."""
    size = layer.width
    scale = float(rng.uniform(0.8, 1.1))
    scaled = layer.resize((round(size * scale),) * 2, Image.Resampling.BICUBIC)
    canvas = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    shift = rng.uniform(-0.07, 0.07, size=2) * size
    x = int((size - scaled.width) / 2 + shift[0])
    y = int((size - scaled.height) / 2 + shift[1])
    canvas.alpha_composite(scaled, (max(x, 0), max(y, 0)), (max(-x, 0), max(-y, 0)))
    return canvas.rotate(float(rng.uniform(-12, 12)), Image.Resampling.BICUBIC)


def _busy_background(size: int, rng: np.random.Generator) -> Image.Image:
    """Sharp, textured clutter: random rectangles and lines (what a camera sees behind a person)."""
    image = Image.new("RGB", (size, size), _colour(rng, 40, 220))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(15, 30))):
        x0, y0 = (int(v) for v in rng.integers(0, size, size=2))
        w, h = (int(v) for v in rng.integers(size // 16, size // 3, size=2))
        draw.rectangle((x0, y0, x0 + w, y0 + h), fill=_colour(rng, 0, 255))
    for _ in range(int(rng.integers(10, 20))):
        points = [tuple(int(v) for v in rng.integers(0, size, size=2)) for _ in range(2)]
        draw.line(points, fill=_colour(rng, 0, 255), width=int(rng.integers(1, 4)))
    return image


def _blurred_background(size: int, rng: np.random.Generator) -> Image.Image:
    """A strongly blurred, bokeh-like backdrop (what generators like to paint)."""
    image = Image.new("RGB", (size, size), _colour(rng, 60, 200))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(5, 10))):
        x, y = (int(v) for v in rng.integers(0, size, size=2))
        r = int(rng.integers(size // 8, size // 3))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=_colour(rng, 30, 255))
    return image.filter(ImageFilter.GaussianBlur(radius=size / 10))


def _render(person: _Person, rng: np.random.Generator, size: int, label: str) -> Image.Image:
    """One RGB image of a person, with the tells of its class, at size x size."""
    big = size * SUPERSAMPLE
    if label == "real":
        face = _pose(_draw_face(big, person, rng, asymmetry=0.02), rng)
        image = _busy_background(big, rng)
    else:
        face = _pose(_mirror(_draw_face(big, person, rng, asymmetry=0.0)), rng)
        face = face.filter(ImageFilter.GaussianBlur(radius=1.5 * SUPERSAMPLE / 2))
        image = _blurred_background(big, rng)
    image.paste(face, (0, 0), face)
    image = image.resize((size, size), Image.Resampling.LANCZOS)
    if label == "real":
        noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, rng.uniform(8, 12), (size, size, 3))
        image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")
    return image


def _encode(image: Image.Image, fmt: str, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    if fmt == "JPEG":
        image.save(buffer, "JPEG", quality=quality)
    else:
        image.save(buffer, fmt)
    return buffer.getvalue()


def class_files(seed: int, n_persons: int, size: int, label: str) -> dict[str, bytes]:
    """Relative path -> bytes of the clean originals of one class (deterministic for the seed)."""
    class_id = 0 if label == "real" else 1
    prefix = "person" if label == "real" else "prompt"
    files: dict[str, bytes] = {}
    for index in range(n_persons):
        person_rng = np.random.default_rng([seed, class_id, index])
        person = _make_person(person_rng)
        n_images = int(person_rng.integers(2, 5))
        for number in range(1, n_images + 1):
            rng = np.random.default_rng([seed, class_id, index, number])
            image = _render(person, rng, size, label)
            if label == "real":
                files[f"{prefix}-{index + 1:02d}/{number:02d}.jpg"] = _encode(image, "JPEG", int(rng.integers(55, 76)))
            else:
                files[f"{prefix}-{index + 1:02d}/{number:02d}.png"] = _encode(image, "PNG")
    return files


def near_duplicate(data: bytes, fmt: str, quality: int) -> bytes:
    """Re-encode an image resized to 90%."""
    with Image.open(io.BytesIO(data)) as image:
        image = image.convert("RGB")
        smaller = image.resize((round(image.width * 0.9), round(image.height * 0.9)), Image.Resampling.LANCZOS)
    return _encode(smaller, fmt, quality)
