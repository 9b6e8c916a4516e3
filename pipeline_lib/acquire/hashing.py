"""The perceptual hash of one image file, pure and pandas-free.

This module imports only numpy, Pillow, scipy.fft and imagehash, so that a worker process that hashes (or
validates and hashes, see `pipeline_lib.acquire.jobs`) starts quickly. The workspace cache lives in `fingerprint`.

The project's hash of an image is not `imagehash.<algo>(Image.open(path))` but
a hash of a box-reduced greyscale image, computed in floating point:

1. decode to 8-bit greyscale. JPEGs are decoded straight to their luma (Y) channel, in both modes; other files
   go through `validate.to_rgb` (alpha onto white, 16 bit scaled) and then PIL's "L" conversion;
2. box-reduce by s, the largest of 8, 4, 2, 1 that keeps both sides >= T = DRAFT_FACTOR * hash_size (exactly
   the scale PIL's JPEG draft mode picks for a requested size (T, T)), then box-reduce again by the largest
   integer k that keeps both sides >= T (a 4 MP photo: 2309x1732 -> 289x217 -> 97x73). A box reduce by f is
   the mean of each f x f block of the image edge-replicated to a multiple of f (as a JPEG encoder pads its
   blocks), kept in float32: no rounding to 8 bits after the decode;
3. phash and dhash are computed here in float, exactly as imagehash defines them: phash LANCZOS-resizes (PIL
   mode "F") to 4 * hash_size squared, takes the 2-D DCT-II (unnormalised, as scipy), keeps the low-frequency
   hash_size x hash_size block and compares it with its median; dhash LANCZOS-resizes to (hash_size + 1,
   hash_size) and compares horizontally adjacent pixels. Bits are packed as imagehash.ImageHash packs them.
   ahash and whash (not the default) are imagehash applied to the step-2 image rounded to 8 bits.

With draft=True (the default), step 1 + the first box reduce of a JPEG are done by the decoder itself (DCT
scaling at 1/s: a block's scaled value is the mean of its 8x8, 4x4 or 2x2 samples, i.e. a box average), which
only has to entropy-decode the file. Defining the hash through the box reduce makes the draft and full-decode
hashes agree: the two reduced images differ only by the decoder's rounding of the scaled samples (< 0.5 of a
level), and keeping everything after it in float (version 2 rounded to 8 bits twice more, in the second reduce
and inside imagehash) leaves too little difference to flip a bit (benchmarks/README.md). The price is that the
hash is not bit-identical to imagehash on the raw decoded image (a few of 64 bits differ on most photos). Hashes
from another definition are never mixed: the hash cache's file name carries the digest of this code
(`fingerprint.hash_code`), so changing it recomputes the hashes with no version to bump.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import imagehash
import numpy as np
import scipy.fft
from PIL import Image

from pipeline_lib.acquire.validate import to_rgb

ALGORITHMS: tuple[str, ...] = ("phash", "dhash", "whash", "ahash")
# T = DRAFT_FACTOR * hash_size: images are box-reduced to >= T pixels per side before the final LANCZOS resize;
# twice what phash and whash resize to (4 * hash_size), so the LANCZOS resize still does the filtering.
DRAFT_FACTOR = 8
PHASH_FACTOR = 4  # phash's DCT input is (PHASH_FACTOR * hash_size) squared, imagehash's highfreq_factor


def resize_float(luma: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """LANCZOS resize of a float image to size (width, height) in PIL mode "F", as float64."""
    image = Image.fromarray(np.ascontiguousarray(luma, dtype=np.float32))
    return np.asarray(image.resize(size, Image.Resampling.LANCZOS), dtype=np.float64)


def phash_bits(luma: np.ndarray, hash_size: int) -> np.ndarray:
    """imagehash's phash in float: low-frequency DCT-II block of the resized image above its median."""
    side = PHASH_FACTOR * hash_size
    pixels = resize_float(luma, (side, side))
    spectrum = scipy.fft.dct(scipy.fft.dct(pixels, type=2, axis=0), type=2, axis=1)
    low = spectrum[:hash_size, :hash_size]
    return low > np.median(low)


def dhash_bits(luma: np.ndarray, hash_size: int) -> np.ndarray:
    """imagehash's dhash in float: is each pixel of the (hash_size + 1) x hash_size image below its right one."""
    pixels = resize_float(luma, (hash_size + 1, hash_size))
    return pixels[:, 1:] > pixels[:, :-1]


def _as_grey_image(luma: np.ndarray) -> Image.Image:
    """The float image rounded to 8-bit greyscale (for the imagehash-computed algorithms)."""
    return Image.fromarray(np.clip(np.rint(luma), 0, 255).astype(np.uint8))


def _phash(luma: np.ndarray, hash_size: int) -> imagehash.ImageHash:
    return imagehash.ImageHash(phash_bits(luma, hash_size))


def _dhash(luma: np.ndarray, hash_size: int) -> imagehash.ImageHash:
    return imagehash.ImageHash(dhash_bits(luma, hash_size))


def _whash(luma: np.ndarray, hash_size: int) -> imagehash.ImageHash:
    # A fixed image_scale: imagehash's default depends on the decoded size, which draft mode changes.
    return imagehash.whash(_as_grey_image(luma), hash_size=hash_size, image_scale=4 * hash_size)


def _ahash(luma: np.ndarray, hash_size: int) -> imagehash.ImageHash:
    return imagehash.average_hash(_as_grey_image(luma), hash_size=hash_size)


_HASHERS: dict[str, Callable[[np.ndarray, int], imagehash.ImageHash]] = {
    "phash": _phash,
    "dhash": _dhash,
    "whash": _whash,
    "ahash": _ahash,
}


def check_params(algorithm: str, hash_size: int) -> None:
    """Raise ValueError naming the problem if algorithm or hash_size cannot be used."""
    if algorithm not in _HASHERS:
        raise ValueError(f"unknown hash algorithm {algorithm!r}; expected one of {', '.join(ALGORITHMS)}")
    if hash_size < 2:
        raise ValueError(f"hash_size must be >= 2, got {hash_size}")
    if algorithm == "whash" and hash_size & (hash_size - 1):
        raise ValueError(f"whash needs a power-of-two hash_size, got {hash_size}")


def draft_scale(size: tuple[int, int], target: int) -> int:
    """The largest of 8, 4, 2, 1 keeping both sides >= target after dividing (PIL's JPEG draft rule)."""
    whole = min(size[0] // target, size[1] // target)
    return next((scale for scale in (8, 4, 2, 1) if whole >= scale), 1)


def reduced_size(size: tuple[int, int], factor: int) -> tuple[int, int]:
    """Size after a box reduce (or DCT scaling) by factor: partial blocks count, as in PIL and libjpeg."""
    return (-(-size[0] // factor), -(-size[1] // factor))


def box_reduce(pixels: np.ndarray, factor: int) -> np.ndarray:
    """float32 means of factor x factor blocks of a 2-D image edge-replicated to a multiple of factor."""
    if factor <= 1:
        return pixels.astype(np.float32)
    height, width = pixels.shape
    rows, columns = -(-height // factor), -(-width // factor)
    padded = np.pad(pixels, ((0, rows * factor - height), (0, columns * factor - width)), mode="edge")
    sums = padded.reshape(rows, factor, columns * factor).sum(axis=1, dtype=np.float64)  # exact: few 24-bit terms
    sums = sums.reshape(rows, columns, factor).sum(axis=2)
    return (sums / (factor * factor)).astype(np.float32)


def prepare_decode(image: Image.Image, hash_size: int, draft: bool = True) -> None:
    """Before a JPEG's pixels are decoded: ask its decoder for luma only, DCT-scaled to the draft scale if draft.

    Other formats are left as they are. Call on an opened image whose pixels are not loaded yet.
    """
    if image.format == "JPEG":  # luma straight from the decoder, DCT-scaled by 1/scale in draft mode
        target = DRAFT_FACTOR * hash_size
        image.draft("L", (target, target) if draft else None)


def luma_of_decoded(image: Image.Image, size: tuple[int, int], hash_size: int) -> np.ndarray:
    """The canonical box-reduced float32 greyscale image (see the module docstring) of an image decoded after
    prepare_decode; size is its stored size (before any DCT scaling)."""
    target = DRAFT_FACTOR * hash_size
    grey = image if image.mode == "L" else to_rgb(image).convert("L")
    pixels = np.asarray(grey)
    scale = draft_scale(size, target)
    first = reduced_size(size, scale)
    shape = (pixels.shape[1], pixels.shape[0])
    if shape == size:
        luma = box_reduce(pixels, scale)
    elif shape == first:  # the decoder's DCT scaling did the first reduce
        luma = pixels.astype(np.float32)
    else:  # a decoder that scaled differently: fall back to a box resize
        resized = Image.fromarray(pixels.astype(np.float32)).resize(first, Image.Resampling.BOX)
        luma = np.asarray(resized, dtype=np.float32)
    return box_reduce(luma, max(1, min(first[0] // target, first[1] // target)))


def hashes_of_luma(luma: np.ndarray, algorithm: str, hash_size: int) -> tuple[str, str]:
    """Hex hashes (configured algorithm, dhash) of a reduced luma image."""
    return str(_HASHERS[algorithm](luma, hash_size)), str(_dhash(luma, hash_size))


def hash_decoded(image: Image.Image, size: tuple[int, int], algorithm: str, hash_size: int) -> tuple[str, str]:
    """Hex hashes (configured algorithm, dhash) of an image decoded after prepare_decode (size: its stored size)."""
    return hashes_of_luma(luma_of_decoded(image, size, hash_size), algorithm, hash_size)


def reduced_luma(path: Path, hash_size: int = 8, draft: bool = True) -> np.ndarray:
    """The canonical box-reduced float32 greyscale image of path that is hashed (see the module docstring)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            size = image.size
            prepare_decode(image, hash_size, draft)
            image.load()
            return luma_of_decoded(image, size, hash_size)


def hash_pair(path: Path, algorithm: str = "phash", hash_size: int = 8, draft: bool = True) -> tuple[str, str]:
    """Hex hashes (configured algorithm, dhash) of one image file, decoding it once."""
    check_params(algorithm, hash_size)
    return hashes_of_luma(reduced_luma(Path(path), hash_size, draft), algorithm, hash_size)


def hash_image(path: Path, algorithm: str = "phash", hash_size: int = 8, draft: bool = True) -> str:
    """Hex perceptual hash of one image file (pixels as stored, no EXIF rotation)."""
    return hash_pair(path, algorithm, hash_size, draft)[0]
