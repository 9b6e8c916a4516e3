"""check_image on a corpus of malformed and unusual files made in the test."""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from pipeline_lib.acquire.validate import ImageCheck, UnsupportedModeError, check_image, sniff_content, to_rgb

MIN_SIDE = 16
MAX_PIXELS = 10_000_000


def photo(size: tuple[int, int] = (64, 48), seed: int = 0) -> Image.Image:
    """A smooth RGB 'photo' with some noise (compresses like a real one)."""
    rng = np.random.default_rng(seed)
    w, h = size
    x, y = np.meshgrid(np.linspace(0, 1, w), np.linspace(0, 1, h))
    base = np.stack([x * 255, y * 255, (1 - x) * 200], axis=-1)
    noise = rng.normal(0, 8, base.shape)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


def encode(image: Image.Image, fmt: str, **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def png_claiming_size(width: int, height: int) -> bytes:
    """A real small PNG whose IHDR (with a valid CRC) claims width x height."""
    data = bytearray(encode(photo((8, 8)), "PNG"))
    ihdr = bytes(data[12:16]) + struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(ihdr) & 0xFFFFFFFF)
    return bytes(data)


def png_with_bad_idat_crc() -> bytes:
    """A PNG whose IDAT chunk checksum is wrong (bytes flipped inside compressed data)."""
    data = bytearray(encode(photo((32, 32)), "PNG"))
    start = data.index(b"IDAT") + 4
    data[start + 10] ^= 0xFF
    return bytes(data)


def animated_gif() -> bytes:
    frames = [photo((40, 40), seed=i).convert("P") for i in range(3)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def exif_rotated_jpeg(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[274] = orientation
    return encode(photo((64, 40)), "JPEG", exif=exif.tobytes())


def palette_with_transparency() -> bytes:
    image = photo((40, 40)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return encode(image, "PNG", transparency=0)


def sixteen_bit_png() -> bytes:
    levels = (np.arange(40 * 40, dtype=np.uint16).reshape(40, 40) * 40).astype(np.uint16)
    return encode(Image.fromarray(levels), "PNG")


def float_tiff() -> bytes:
    return encode(Image.fromarray(np.linspace(0, 1, 40 * 40, dtype=np.float32).reshape(40, 40)), "TIFF")


@dataclass(frozen=True)
class Case:
    name: str
    data: bytes
    reason: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    mode: str = ""


def corpus() -> list[Case]:
    """Every kind of file a crawl can bring back, with the verdict we expect."""
    jpeg, png, webp = encode(photo(), "JPEG"), encode(photo(), "PNG"), encode(photo(), "WEBP")
    html = b"<!DOCTYPE html><html><head><title>Access denied</title></head><body>403</body></html>"
    svg = b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>'
    return [
        Case("zero.jpg", b"", "zero_bytes"),
        Case("truncated.jpg", jpeg[: len(jpeg) // 2], "truncated"),
        Case("truncated.png", png[: len(png) // 2], "truncated"),
        Case("truncated.webp", webp[: len(webp) // 2], "truncated"),
        Case("page.jpg", html, "not_an_image:html"),
        Case("logo.jpg", svg, "not_an_image:svg"),
        Case("notes.jpg", b"just some words\nin a text file\n", "not_an_image:text"),
        Case("doc.jpg", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj", "not_an_image:pdf"),
        Case("noise.jpg", bytes(np.random.default_rng(1).integers(0, 256, 300, dtype=np.uint8)), "not_an_image:binary"),
        Case("huge_header.png", png_claiming_size(100_000, 100_000), "decompression_bomb"),
        Case("over_limit.png", png, "decompression_bomb", {"max_pixels": 1000}),
        Case("bad_crc.png", png_with_bad_idat_crc(), "corrupt:OSError"),
        Case("small.png", encode(photo((10, 40)), "PNG"), "too_small"),
        Case("one_pixel.png", encode(photo((1, 1)), "PNG"), "too_small"),
        Case("animated.gif", animated_gif(), "", mode="P"),
        Case("animated_rejected.gif", animated_gif(), "animated", {"animated_policy": "reject"}),
        Case("float.tiff", float_tiff(), "unsupported_mode"),
        Case("cmyk.jpg", encode(photo().convert("CMYK"), "JPEG"), "", mode="CMYK"),
        Case("palette_alpha.png", palette_with_transparency(), "", mode="P"),
        Case("la.png", encode(photo().convert("LA"), "PNG"), "", mode="LA"),
        Case("rgba.png", encode(photo().convert("RGBA"), "PNG"), "", mode="RGBA"),
        Case("sixteen.png", sixteen_bit_png(), "", mode="I;16"),
        Case("photo.webp", webp, "", mode="RGB"),
        Case("photo.bmp", encode(photo(), "BMP"), "", mode="RGB"),
        Case("photo.tiff", encode(photo(), "TIFF"), "", mode="RGB"),
        Case("rotated.jpg", exif_rotated_jpeg(6), "", mode="RGB"),
        Case("grey.jpg", encode(photo().convert("L"), "JPEG"), "", mode="L"),
        Case("bilevel.png", encode(photo().convert("1"), "PNG"), "", mode="1"),
        Case("mislabelled_png.jpg", png, "", mode="RGB"),
    ]


def run_case(case: Case, folder: Path) -> ImageCheck:
    path = folder / case.name
    path.write_bytes(case.data)
    kwargs = {"min_side": MIN_SIDE, "max_pixels": MAX_PIXELS, "animated_policy": "first_frame", **case.kwargs}
    return check_image(path, **kwargs)


def test_every_corpus_file_gets_its_specific_verdict(tmp_path: Path) -> None:
    cases = corpus()
    assert len(cases) >= 20, "the corpus must hold at least 20 files"
    results = {case.name: run_case(case, tmp_path) for case in cases}
    assert len(results) == len(cases), "one check per file: count in must equal count out"
    wrong = {
        name: (result.reason, case.reason)
        for case in cases
        for name, result in [(case.name, results[case.name])]
        if result.reason != case.reason or result.ok != (case.reason == "")
    }
    assert not wrong, f"file -> (got reason, expected reason): {wrong}"
    wrong_modes = {c.name: results[c.name].mode for c in cases if c.mode and results[c.name].mode != c.mode}
    assert not wrong_modes, f"recorded PIL mode differs from the original's: {wrong_modes}"


def test_ok_file_records_size_format_bytes_and_exif_orientation(tmp_path: Path) -> None:
    case = Case("rotated.jpg", exif_rotated_jpeg(6), "")
    result = run_case(case, tmp_path)
    assert (result.width, result.height) == (64, 40), "size must be the stored (unrotated) pixel size"
    assert result.format == "JPEG", f"format should be JPEG, got {result.format}"
    assert result.exif_orientation == 6, f"EXIF orientation tag 274 not recorded, got {result.exif_orientation}"
    assert result.n_bytes == len(case.data), "n_bytes must be the file size"
    plain = run_case(Case("plain.jpg", encode(photo(), "JPEG"), ""), tmp_path)
    assert plain.exif_orientation is None, "a JPEG without EXIF must have exif_orientation None"


def test_animated_first_frame_is_ok_and_flagged(tmp_path: Path) -> None:
    result = run_case(Case("anim.gif", animated_gif(), ""), tmp_path)
    assert result.ok and result.animated, f"animated GIF with first_frame policy must be ok and animated: {result}"


def test_check_leaves_file_and_pil_settings_untouched(tmp_path: Path) -> None:
    before_limit = Image.MAX_IMAGE_PIXELS
    checked = []
    for case in corpus():
        path = tmp_path / case.name
        path.write_bytes(case.data)
        stat = path.stat()
        check_image(path, MIN_SIDE, 10**12, "first_frame")  # a limit above PIL's own: lifted only temporarily
        assert path.read_bytes() == case.data, f"check_image changed the bytes of {case.name}"
        assert path.stat().st_mtime_ns == stat.st_mtime_ns, f"check_image touched {case.name}"
        checked.append(case.name)
    assert Image.MAX_IMAGE_PIXELS == before_limit, "PIL's global MAX_IMAGE_PIXELS was changed"
    assert len(checked) == len(corpus()), "every file should have been checked"


def test_bad_policy_and_missing_file_raise(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(encode(photo(), "PNG"))
    with pytest.raises(ValueError, match="ingest.animated"):
        check_image(path, MIN_SIDE, MAX_PIXELS, "loop")  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError):
        check_image(tmp_path / "missing.png", MIN_SIDE, MAX_PIXELS, "first_frame")


def test_to_rgb_scales_sixteen_bit_and_whitens_transparency() -> None:
    sixteen = Image.open(io.BytesIO(sixteen_bit_png()))
    levels = np.asarray(to_rgb(sixteen))
    assert levels.max() > 200 and len(np.unique(levels)) > 50, "16-bit grey must be scaled to 8 bits, not clipped"
    transparent = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert to_rgb(transparent).getpixel((0, 0)) == (255, 255, 255), "fully transparent pixels must become white"
    with pytest.raises(UnsupportedModeError, match="'F'"):
        to_rgb(Image.new("F", (4, 4)))


def test_sniff_content_names_common_non_images() -> None:
    kinds = {
        "html": sniff_content(b"\n  <html><body>x</body></html>"),
        "svg": sniff_content(b"<svg xmlns='http://www.w3.org/2000/svg'/>"),
        "json": sniff_content(b'{"error": "rate limited"}'),
        "text": sniff_content("plain words, accents é".encode()),
    }
    assert all(k == v for k, v in kinds.items()), f"expected kind -> sniffed kind: {kinds}"


def test_not_an_image_judges_by_content_then_by_name(tmp_path: Path) -> None:
    from pipeline_lib.acquire.validate import not_an_image

    jpeg = tmp_path / "no_extension"
    Image.new("RGB", (8, 8)).save(jpeg, "JPEG")
    html = tmp_path / "page.jpg"  # named like an image: ingest quarantines it with its reason
    html.write_bytes(b"<html><body>gone</body></html>")
    text, empty = tmp_path / "notes.txt", tmp_path / "empty.dat"
    text.write_text("prompts", encoding="utf-8")
    empty.write_bytes(b"")
    assert not_an_image(jpeg) == "" and not_an_image(html) == ""
    assert not_an_image(text) == "not an image (text)" and not_an_image(empty) == "not an image (empty file)"
