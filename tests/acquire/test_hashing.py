"""The perceptual hash definition: draft and full decoding agree, exact float phash/dhash, unusual modes."""

from __future__ import annotations

import io
from pathlib import Path

import imagehash
import numpy as np
import pytest
from PIL import Image, ImageDraw

from pipeline_lib.acquire import hashing
from pipeline_lib.acquire.hashing import hash_decoded, hash_image, hash_pair, prepare_decode
from pipeline_lib.curate.dedup import hamming


def smooth(size: tuple[int, int], seed: int = 0, noise: float = 0.0, cells: int = 6) -> Image.Image:
    """A smooth pattern: a seeded random cells x cells colour grid upsampled bicubically, optionally noisy.

    (Its spectrum has real low-frequency structure; a pure sine pattern has so few non-zero DCT coefficients that
    phash flips bits when the image is merely resized by one pixel.)
    """
    rng = np.random.default_rng(seed)
    grid = rng.integers(0, 256, size=(cells, cells, 3), dtype=np.uint8)
    image = Image.fromarray(grid).resize(size, Image.Resampling.BICUBIC)
    if not noise:
        return image
    pixels = np.asarray(image, dtype=float) + rng.normal(0, noise, (size[1], size[0], 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def test_identical_pixels_hash_identically_across_formats(tmp_path: Path) -> None:
    image = smooth((120, 90), seed=3)
    png, bmp = tmp_path / "a.png", tmp_path / "a.bmp"
    image.save(png)
    image.save(bmp)
    assert hash_pair(png) == hash_pair(bmp)
    assert hash_image(png) == hash_image(png)
    other = tmp_path / "b.png"
    smooth((120, 90), seed=4).save(other)
    assert hash_image(other) != hash_image(png)


def test_hash_is_hex_of_hash_size_squared_bits(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    smooth((80, 80)).save(path)
    for size in (8, 16):
        main, second = hash_pair(path, "phash", size)
        assert len(main) == len(second) == size * size // 4
        int(main, 16), int(second, 16)


def test_draft_decoding_is_smaller_and_agrees_with_full_decode(tmp_path: Path) -> None:
    path = tmp_path / "big.jpg"
    path.write_bytes(encode(smooth((1000, 800), seed=1, noise=3), "JPEG", quality=90))
    drafted = hashing.reduced_luma(path, 8, draft=True)
    full = hashing.reduced_luma(path, 8, draft=False)
    # 1/8 scale (125x100, both sides >= 8 * hash_size = 64), then no further integer box reduce fits
    assert drafted.shape == full.shape == (100, 125) and drafted.dtype == full.dtype == np.float32
    difference = np.abs(drafted.astype(float) - full)
    assert difference.mean() < 0.5 and difference.max() < 2  # DCT scaling is a box average up to rounding
    assert not np.array_equal(np.rint(full), full)  # the full-decode reduce is not rounded to 8 bits
    for algorithm in ("phash", "dhash"):
        assert hash_image(path, algorithm, 8, draft=True) == hash_image(path, algorithm, 8, draft=False), algorithm
    for algorithm in ("ahash", "whash"):  # imagehash on the image rounded to 8 bits: ties may still flip a bit
        fast = int(hash_image(path, algorithm, 8, draft=True), 16)
        slow = int(hash_image(path, algorithm, 8, draft=False), 16)
        assert hamming(fast, slow) <= 2, algorithm


def photo(size: tuple[int, int], seed: int) -> Image.Image:
    """A photo-like image: low-frequency colour field, a few ellipses, pixel noise (as benchmarks/bench_hashing)."""
    width, height = size
    rng = np.random.default_rng(seed)
    field = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    image = Image.fromarray(field).resize(size, Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(8):
        x0, y0 = int(rng.integers(0, width - width // 8)), int(rng.integers(0, height - height // 8))
        x1, y1 = x0 + int(rng.integers(width // 40, width // 4)), y0 + int(rng.integers(height // 40, height // 4))
        draw.ellipse((x0, y0, x1, y1), fill=tuple(int(c) for c in rng.integers(0, 256, size=3)))
    pixels = np.asarray(image, dtype=np.int16) + rng.normal(0, 8, size=(height, width, 3)).astype(np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def test_draft_and_full_decode_hash_equally(tmp_path: Path) -> None:
    path = tmp_path / "photo.jpg"
    for seed in range(4):
        path.write_bytes(encode(photo((1600, 1200), seed), "JPEG", quality=90))
        assert hashing.reduced_luma(path, 8, draft=True).shape == (75, 100)  # 1/8 then a box reduce by 2
        assert hash_pair(path, "phash", 8, draft=True) == hash_pair(path, "phash", 8, draft=False), seed
        fast, slow = hash_pair(path, "phash", 16, draft=True), hash_pair(path, "phash", 16, draft=False)
        assert hamming(int(fast[0], 16), int(slow[0], 16)) <= 2, seed  # 256 bits: more coefficients near ties


def reference_box_reduce(pixels: np.ndarray, factor: int) -> np.ndarray:
    """Block means of the edge-replicated image, written independently of hashing.box_reduce."""
    height, width = pixels.shape
    rows, columns = -(-height // factor), -(-width // factor)
    row_index = np.minimum(np.arange(rows * factor), height - 1)
    column_index = np.minimum(np.arange(columns * factor), width - 1)
    padded = pixels.astype(np.float64)[np.ix_(row_index, column_index)]
    return padded.reshape(rows, factor, columns, factor).mean(axis=(1, 3))


def reference_hex(bits: np.ndarray) -> str:
    """Bits (row-major) as imagehash writes them: one big-endian binary number in zero-padded hex."""
    text = "".join("1" if bit else "0" for bit in bits.flatten())
    return format(int(text, 2), f"0{len(text) // 4}x")


def reference_float_hashes(luma: np.ndarray, hash_size: int = 8) -> dict[str, str]:
    """phash and dhash of a float image as imagehash defines them, without 8-bit rounding."""
    import scipy.fftpack

    image = Image.fromarray(luma.astype(np.float32))
    small = np.asarray(image.resize((4 * hash_size, 4 * hash_size), Image.Resampling.LANCZOS), dtype=np.float64)
    low = scipy.fftpack.dct(scipy.fftpack.dct(small, axis=0), axis=1)[:hash_size, :hash_size]
    wide = np.asarray(image.resize((hash_size + 1, hash_size), Image.Resampling.LANCZOS), dtype=np.float64)
    return {"phash": reference_hex(low > np.median(low)), "dhash": reference_hex(wide[:, 1:] > wide[:, :-1])}


def test_full_decode_hash_is_the_float_hash_of_the_box_reduced_image(tmp_path: Path) -> None:
    path = tmp_path / "photo.jpg"
    path.write_bytes(encode(smooth((1601, 1203), seed=8, noise=6), "JPEG", quality=90))
    with Image.open(path) as image:
        image.draft("L", None)  # the luma plane at full resolution
        luma = np.asarray(image.convert("L"))
    assert luma.shape == (1203, 1601)
    assert hashing.draft_scale((1601, 1203), 64) == 8
    reduced = reference_box_reduce(reference_box_reduce(luma, 8), 2)  # 201x151, then k = 201 // 64, 151 // 64 -> 2
    assert reduced.shape == (76, 101)
    np.testing.assert_allclose(hashing.reduced_luma(path, 8, draft=False), reduced, atol=1e-4)
    grey = Image.fromarray(np.clip(np.rint(reduced), 0, 255).astype(np.uint8))
    expected = {
        **reference_float_hashes(reduced),
        "ahash": str(imagehash.average_hash(grey)),
        "whash": str(imagehash.whash(grey, image_scale=32)),
    }
    for algorithm, value in expected.items():
        assert hash_image(path, algorithm, 8, draft=False) == value, algorithm
    assert hash_pair(path, "ahash", 8, draft=False)[1] == expected["dhash"]
    png = tmp_path / "small.png"
    smooth((300, 200), seed=9).save(png)  # other formats: RGB -> L, then the same box reduces (300x200 -> 150x100)
    with Image.open(png) as image:
        grey_png = np.asarray(image.convert("L"))
    assert hash_pair(png) == tuple(reference_float_hashes(reference_box_reduce(grey_png, 2)).values())


def test_float_hashes_match_imagehash_on_an_image_of_the_final_size() -> None:
    rng = np.random.default_rng(5)
    square = rng.integers(0, 256, size=(32, 32), dtype=np.uint8)  # resizing to its own size changes nothing
    assert str(imagehash.ImageHash(hashing.phash_bits(square.astype(np.float32), 8))) == str(
        imagehash.phash(Image.fromarray(square))
    )
    wide = rng.integers(0, 256, size=(8, 9), dtype=np.uint8)
    assert str(imagehash.ImageHash(hashing.dhash_bits(wide.astype(np.float32), 8))) == str(
        imagehash.dhash(Image.fromarray(wide))
    )


def test_draft_scale_follows_pil_draft() -> None:
    assert hashing.draft_scale((2309, 1732), 64) == 8
    assert hashing.draft_scale((500, 300), 64) == 4
    assert hashing.draft_scale((200, 200), 64) == 2
    assert hashing.draft_scale((100, 60), 64) == 1
    assert hashing.reduced_size((2309, 1732), 8) == (289, 217)


def test_unusual_modes_hash(tmp_path: Path) -> None:
    photo = smooth((64, 64), seed=2)
    levels = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16).astype(np.uint16)
    files = {
        "cmyk.jpg": encode(photo.convert("CMYK"), "JPEG"),
        "la.png": encode(photo.convert("LA"), "PNG"),
        "sixteen.png": encode(Image.fromarray(levels), "PNG"),
        "palette.gif": encode(photo.convert("P"), "GIF"),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        assert len(hash_image(tmp_path / name)) == 16, name


def test_bad_parameters_are_named(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    smooth((40, 40)).save(path)
    with pytest.raises(ValueError, match="unknown hash algorithm 'md5'"):
        hash_image(path, "md5")
    with pytest.raises(ValueError, match="power-of-two hash_size, got 6"):
        hash_image(path, "whash", 6)
    with pytest.raises(ValueError, match="hash_size must be >= 2"):
        hash_image(path, "phash", 1)


def test_hash_of_an_image_decoded_elsewhere_equals_hash_pair(tmp_path: Path) -> None:
    """What ingest does: prepare_decode, one load (for validation), hash_decoded: the same values as hash_pair."""
    files = {
        "photo.jpg": encode(photo((1600, 1200), 1), "JPEG", quality=90),
        "small.jpg": encode(smooth((90, 70), seed=2), "JPEG"),
        "cmyk.jpg": encode(smooth((300, 200), seed=3).convert("CMYK"), "JPEG"),
        "a.png": encode(smooth((300, 200), seed=4), "PNG"),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        for algorithm, size in (("phash", 8), ("whash", 8), ("phash", 16)):
            with Image.open(tmp_path / name) as image:
                stored = image.size
                prepare_decode(image, size)
                image.load()
                assert hash_decoded(image, stored, algorithm, size) == hash_pair(tmp_path / name, algorithm, size)
