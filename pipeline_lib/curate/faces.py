"""Face-count hint for the review pack: OpenCV's bundled frontal-face Haar cascade (optional dependency)."""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

log = logging.getLogger(__name__)

UNAVAILABLE = "face count unavailable"
MAX_SIDE = 640  # images are scaled down to this before detection (speed; faces stay detectable)


@lru_cache(maxsize=1)
def _cascade() -> Any | None:
    """The frontal-face cascade, or None when OpenCV (with its bundled cascades) is not importable."""
    try:
        import cv2
    except ImportError as error:
        log.info("%s: cannot import cv2 (%s)", UNAVAILABLE, error)
        return None
    if not hasattr(cv2, "CascadeClassifier") or not hasattr(cv2, "data"):
        log.info("%s: this OpenCV build has no CascadeClassifier / bundled cascades", UNAVAILABLE)
        return None
    classifier = cv2.CascadeClassifier(str(Path(cv2.data.haarcascades) / "haarcascade_frontalface_default.xml"))
    return None if classifier.empty() else classifier


def available() -> bool:
    """Whether face counting works in this environment."""
    return _cascade() is not None


def count_faces(path: Path) -> int | None:
    """Number of frontal faces in the image at path; None when OpenCV is unavailable or the file unreadable."""
    classifier = _cascade()
    if classifier is None:
        return None
    try:
        with Image.open(path) as image:
            gray = ImageOps.exif_transpose(image.convert("L"))
    except OSError as error:
        log.warning("face count: cannot read %s: %s", path, error)
        return None
    gray.thumbnail((MAX_SIDE, MAX_SIDE))
    pixels = np.asarray(gray, dtype=np.uint8)
    side = min(pixels.shape[:2])
    min_size = max(16, side // 10)
    faces = classifier.detectMultiScale(pixels, scaleFactor=1.1, minNeighbors=5, minSize=(min_size, min_size))
    return int(len(faces))


def face_hint(path: Path) -> tuple[str, bool]:
    """A human-readable face hint and whether it is flagged (no face or more than one)."""
    count = count_faces(path)
    if count is None:
        return UNAVAILABLE, False
    if count == 0:
        return "no face found", True
    if count > 1:
        return f"{count} faces", True
    return "1 face", False
