"""Image validation: decode each file fully and say why it is unusable, without changing it."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal, TypeVar

import numpy as np
from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)

AnimatedPolicy = Literal["first_frame", "reject"]
Prepare = Callable[[Image.Image], None]  # called on an opened image before its pixels are decoded
T = TypeVar("T")
EXIF_ORIENTATION_TAG = 274
SNIFF_BYTES = 512
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".jfif", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".heic", ".heif", ".avif"}
)

# Magic numbers of formats we expect; a file starting with one that PIL cannot identify is corrupt, not "not an image".
_IMAGE_MAGIC: tuple[bytes, ...] = (
    b"\xff\xd8\xff",  # JPEG
    b"\x89PNG\r\n\x1a\n",
    b"GIF87a",
    b"GIF89a",
    b"BM",
    b"II*\x00",  # TIFF little-endian
    b"MM\x00*",  # TIFF big-endian
    b"RIFF",  # WebP (RIFF....WEBP)
)


class UnsupportedModeError(ValueError):
    """An image's PIL mode has no sensible conversion to RGB."""


@dataclass(frozen=True)
class ImageCheck:
    """What validation found out about one file; reason is "" when ok."""

    ok: bool
    reason: str
    width: int | None
    height: int | None
    format: str
    mode: str
    exif_orientation: int | None
    n_bytes: int
    animated: bool


def _alpha_to_rgb(image: Image.Image) -> Image.Image:
    """Composite an image with transparency onto white (transparent pixels carry arbitrary colours)."""
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _sixteen_bit_to_rgb(image: Image.Image) -> Image.Image:
    """Scale 16-bit (or 32-bit integer holding 16-bit) grey levels to 8 bits; PIL's convert would clip at 255."""
    levels = np.asarray(image, dtype=np.int64)
    grey = (np.clip(levels, 0, 65535) // 257).astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")


def _plain_to_rgb(image: Image.Image) -> Image.Image:
    return image.convert("RGB")


def _palette_to_rgb(image: Image.Image) -> Image.Image:
    if "transparency" in image.info:
        return _alpha_to_rgb(image)
    return image.convert("RGB")


# PIL mode -> converter to 8-bit RGB. Modes not listed (F, LAB, La, BGR;15, ...) are unsupported.
RGB_CONVERTERS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "1": _plain_to_rgb,
    "L": _plain_to_rgb,
    "RGB": _plain_to_rgb,
    "RGBX": _plain_to_rgb,
    "CMYK": _plain_to_rgb,
    "YCbCr": _plain_to_rgb,
    "HSV": _plain_to_rgb,
    "P": _palette_to_rgb,
    "PA": _alpha_to_rgb,
    "LA": _alpha_to_rgb,
    "RGBA": _alpha_to_rgb,
    "RGBa": _alpha_to_rgb,
    "I": _sixteen_bit_to_rgb,
    "I;16": _sixteen_bit_to_rgb,
    "I;16L": _sixteen_bit_to_rgb,
    "I;16B": _sixteen_bit_to_rgb,
    "I;16N": _sixteen_bit_to_rgb,
}


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a decoded image to 8-bit RGB (alpha onto white, 16-bit scaled); raise UnsupportedModeError."""
    converter = RGB_CONVERTERS.get(image.mode)
    if converter is None:
        raise UnsupportedModeError(
            f"image mode {image.mode!r} cannot be converted to RGB; supported: {', '.join(RGB_CONVERTERS)}"
        )
    return converter(image)


def sniff_content(head: bytes) -> str:
    """Name what a non-image file looks like from its first bytes: html, svg, xml, pdf, json, text or binary."""
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith(b"%pdf"):
        return "pdf"
    if text.startswith((b"<!doctype html", b"<html")) or b"<html" in text or b"<body" in text:
        return "html"
    if text.startswith(b"<svg") or b"<svg" in text:
        return "svg"
    if text.startswith(b"<?xml"):
        return "xml"
    if text.startswith((b"{", b"[")):
        return "json"
    try:
        decoded = head.decode("utf-8")
    except UnicodeDecodeError:
        return "binary"
    printable = sum(ch.isprintable() or ch.isspace() for ch in decoded)
    return "text" if printable >= 0.95 * max(1, len(decoded)) else "binary"


def _is_truncated_riff(head: bytes, n_bytes: int) -> bool:
    """A RIFF container (WebP) whose declared size is larger than the file."""
    if not head.startswith(b"RIFF") or len(head) < 8:
        return False
    return int.from_bytes(head[4:8], "little") + 8 > n_bytes


def _open_failure_reason(error: Exception, head: bytes, n_bytes: int) -> str:
    """Reason for a file PIL could not open: not an image (sniffed), truncated, or corrupt."""
    if isinstance(error, Image.DecompressionBombError):
        return "decompression_bomb"
    if not head.startswith(_IMAGE_MAGIC):
        return f"not_an_image:{sniff_content(head)}"
    if _is_truncated_riff(head, n_bytes) or "truncated" in str(error).lower():
        return "truncated"
    return f"corrupt:{type(error).__name__}"


def _decode_failure_reason(error: Exception, head: bytes, n_bytes: int) -> str:
    """Reason for a file PIL opened but could not decode."""
    message = str(error).lower()
    if "truncated" in message or isinstance(error, EOFError) or _is_truncated_riff(head, n_bytes):
        return "truncated"
    return f"corrupt:{type(error).__name__}"


@contextlib.contextmanager
def _pixel_limit(max_pixels: int) -> Iterator[None]:
    """Let PIL open images up to max_pixels without its bomb warning; restore PIL's settings on exit.

    We compare sizes to max_pixels ourselves right after the header is read. PIL's own hard limit
    (2 * Image.MAX_IMAGE_PIXELS) is only lifted, for the duration of the block, when max_pixels exceeds it.
    """
    previous = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        if previous is not None and max_pixels > 2 * previous:
            Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = previous


def _read_orientation(image: Image.Image) -> int | None:
    """EXIF orientation (tag 274) or None; unreadable EXIF is logged and treated as absent."""
    try:
        value = image.getexif().get(EXIF_ORIENTATION_TAG)
    except (OSError, SyntaxError, ValueError, TypeError, KeyError) as error:
        log.warning("unreadable EXIF in %s image: %s: %s", image.format, type(error).__name__, error)
        return None
    return int(value) if isinstance(value, int) else None


def _header_problem(image: Image.Image, min_side: int, max_pixels: int, animated_policy: AnimatedPolicy) -> str:
    """Reason found from the header alone (before decoding pixels), or ""."""
    width, height = image.size
    if width * height > max_pixels:
        return "decompression_bomb"
    if min(width, height) < min_side:
        return "too_small"
    if animated_policy == "reject" and getattr(image, "n_frames", 1) > 1:
        return "animated"
    if image.mode not in RGB_CONVERTERS:
        return "unsupported_mode"
    return ""


def _check_opened(
    image: Image.Image,
    base: ImageCheck,
    head: bytes,
    min_side: int,
    max_pixels: int,
    policy: AnimatedPolicy,
    prepare: Prepare | None = None,
) -> ImageCheck:
    """Fill size/format/mode from the header, decode the (first frame's) pixels, then read EXIF orientation.

    prepare(image) runs just before the decode (e.g. a JPEG draft request).
    """
    found = dataclasses.replace(
        base,
        width=image.size[0],
        height=image.size[1],
        format=image.format or "",
        mode=image.mode,
        animated=getattr(image, "n_frames", 1) > 1,
    )
    reason = _header_problem(image, min_side, max_pixels, policy)
    if reason:
        return _with_reason(found, reason)
    try:
        if prepare is not None:
            prepare(image)
        image.load()
    except Exception as error:  # PIL decoders raise many types; each becomes a recorded reason
        return _with_reason(found, _decode_failure_reason(error, head, base.n_bytes))
    # After load(): PNG keeps EXIF after the pixel data, so reading it earlier would decode (and hide errors).
    return _with_reason(dataclasses.replace(found, exif_orientation=_read_orientation(image)), "")


def _with_reason(check: ImageCheck, reason: str) -> ImageCheck:
    return dataclasses.replace(check, ok=not reason, reason=reason)


def check_image(path: Path, min_side: int, max_pixels: int, animated_policy: AnimatedPolicy) -> ImageCheck:
    """Validate one file by decoding it fully; never modifies the file.

    Reasons: zero_bytes, not_an_image:<kind>, truncated, decompression_bomb, too_small, animated,
    unsupported_mode, corrupt:<ExceptionClass>. Raises ValueError for a bad policy or limit,
    FileNotFoundError if path does not exist.
    """
    return inspect_image(path, min_side, max_pixels, animated_policy)[0]


def inspect_image(
    path: Path,
    min_side: int,
    max_pixels: int,
    animated_policy: AnimatedPolicy,
    prepare: Prepare | None = None,
    use: Callable[[Image.Image, ImageCheck], T] | None = None,
) -> tuple[ImageCheck, T | None]:
    """check_image with hooks into its one decode: (the check, what use returned, or None if the file failed).

    prepare(image) runs on the opened image just before its pixels are decoded (e.g. a JPEG's draft request: the
    decoder still reads the whole compressed stream, so truncation and corruption are found as in a full-size
    decode); use(image, check) runs on the decoded image of a file that passed. Exceptions from use propagate.
    """
    if animated_policy not in ("first_frame", "reject"):
        raise ValueError(f"ingest.animated must be 'first_frame' or 'reject', got {animated_policy!r}")
    with _opened(path, min_side, max_pixels) as (image, reason, head, n_bytes):
        base = ImageCheck(False, "", None, None, "", "", None, n_bytes, False)
        if image is None:
            return _with_reason(base, reason), None
        check = _check_opened(image, base, head, min_side, max_pixels, animated_policy, prepare)
        return check, (use(image, check) if check.ok and use is not None else None)


@contextlib.contextmanager
def _opened(path: Path, min_side: int, max_pixels: int) -> Iterator[tuple[Image.Image | None, str, bytes, int]]:
    """The file opened lazily under the pixel bound: (image, "", its first bytes, its size), or (None, why it cannot
    be opened, ...); no pixel is decoded here."""
    if min_side < 1 or max_pixels < 1:
        raise ValueError(f"min_side and max_pixels must be >= 1, got {min_side} and {max_pixels}")
    n_bytes = Path(path).stat().st_size
    if n_bytes == 0:
        yield None, "zero_bytes", b"", 0
        return
    with open(path, "rb") as handle:
        head = handle.read(SNIFF_BYTES)
    with _pixel_limit(max_pixels):
        try:
            image = Image.open(path)
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as error:
            yield None, _open_failure_reason(error, head, n_bytes), head, n_bytes
            return
        with image:
            yield image, "", head, n_bytes


def not_an_image(path: Path, handle: BinaryIO | None = None) -> str:
    """Why an import leaves path out ("" when it is taken): not an image by its bytes nor by its name.

    A file Pillow recognises is an image whatever its extension; a file named like an image that Pillow cannot read
    is taken too, so that ingest quarantines it with the reason (truncated, html, ...). handle: the file opened
    already (e.g. by local_files.open_inside, so that no path is followed again); it is read from its start.
    """
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return ""
    if handle is not None:
        return _content_reason(handle)
    try:
        with path.open("rb") as opened:
            return _content_reason(opened)
    except OSError as error:
        return f"unreadable: {error.strerror or error}"


def _content_reason(handle: BinaryIO) -> str:
    """"" when Pillow recognises the file's bytes as an image, else "not an image (<what the bytes look like>)"."""
    try:
        with Image.open(handle):  # a file object passed in stays open
            return ""
    except Exception:  # anything Pillow cannot identify is not an image to import
        pass
    handle.seek(0)
    head = handle.read(SNIFF_BYTES)
    return f"not an image ({sniff_content(head) if head else 'empty file'})"


def check_header(path: Path, min_side: int, max_pixels: int, animated_policy: AnimatedPolicy) -> str:
    """Why ingest would refuse this file judging by its header alone ("" if nothing): for scoring outside the
    pipeline (predict), before any pixel is decoded. Same reasons as check_image for what the header shows."""
    with _opened(path, min_side, max_pixels) as (image, reason, _, _):
        return reason if image is None else _header_problem(image, min_side, max_pixels, animated_policy)
