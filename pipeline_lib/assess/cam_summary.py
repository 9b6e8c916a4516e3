"""CAM attention summary over a split: how much of the class-activation mass sits on the border and on text.

Models that look at watermarks, borders or collage layouts instead of content put a large share of their CAM mass
on the image border or on text-like regions. `cam_attention_summary` reports the border share per image and its
mean, and flags images above a threshold; `text_mask` marks text-like regions with a simple edge-density
heuristic (dense short vertical strokes along horizontal lines, from a Sobel filter) and `text_share` measures the
CAM mass on them.
"""

from __future__ import annotations

import logging

import numpy as np
from PIL import Image
from scipy import ndimage

log = logging.getLogger(__name__)

CAM_FLAG_ABOVE = 0.5  # a CAM attention share (border or text) above this is flagged


def _check_cams(cams: np.ndarray) -> np.ndarray:
    array = np.asarray(cams, dtype=np.float64)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or array.shape[1] < 1 or array.shape[2] < 1:
        raise ValueError(f"cams must be shaped (N, H, W), got {array.shape}")
    if array.size and (np.isnan(array).any() or array.min() < 0 or array.max() > 1):
        raise ValueError("cams must hold values in [0, 1] without NaN")
    return array


def border_mask(height: int, width: int, border_fraction: float = 0.1) -> np.ndarray:
    """Boolean (H, W) mask of the outer band, border_fraction of each side's length (at least 1 pixel)."""
    if not 0 < border_fraction < 0.5:
        raise ValueError(f"border_fraction must be in (0, 0.5), got {border_fraction}")
    band_h, band_w = max(1, round(height * border_fraction)), max(1, round(width * border_fraction))
    mask = np.ones((height, width), dtype=bool)
    mask[band_h : height - band_h, band_w : width - band_w] = False
    return mask


def _mass_share(cams: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Per image: CAM mass inside mask / total mass (NaN for an all-zero map)."""
    total = cams.sum(axis=(1, 2))
    inside = (cams * masks).sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, inside / np.where(total > 0, total, 1), np.nan)


def border_shares(cams: np.ndarray, border_fraction: float = 0.1) -> np.ndarray:
    """Share of each CAM's mass in the border band (uniform map: 1 - (1 - 2f)^2, 0.36 for f = 0.1)."""
    array = _check_cams(cams)
    return _mass_share(array, border_mask(array.shape[1], array.shape[2], border_fraction)[None])


def text_mask(
    image: np.ndarray, edge_threshold: float = 0.25, min_density: float = 0.2, window: int | None = None
) -> np.ndarray:
    """Boolean (H, W) mask of text-like regions of a uint8 (H, W, 3) image.

    Heuristic: strong horizontal-gradient edges (vertical strokes of glyphs, Sobel x on grey levels, normalised to
    the image's strongest edge) that are dense within a wide, short window (text runs along horizontal lines).
    """
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"image must be uint8 (H, W, 3), got {array.dtype} {array.shape}")
    grey = array.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    gx = np.abs(ndimage.sobel(grey, axis=1))
    gy = np.abs(ndimage.sobel(grey, axis=0))
    peak = gx.max()
    if peak <= 0:
        return np.zeros(grey.shape, dtype=bool)
    strokes = (gx / peak > edge_threshold) & (gx > gy)  # mostly vertical stroke edges
    size = window or max(3, min(grey.shape) // 16)
    density = ndimage.uniform_filter(strokes.astype(np.float64), size=(size, 3 * size), mode="constant")
    return density >= min_density


def _fit_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if mask.shape == shape:
        return mask
    resized = Image.fromarray(mask.astype(np.uint8) * 255).resize((shape[1], shape[0]), Image.Resampling.NEAREST)
    return np.asarray(resized) > 127


def text_share(cams: np.ndarray, masks: np.ndarray | list[np.ndarray]) -> np.ndarray:
    """Share of each CAM's mass on its image's text mask (masks resized to the CAM's size with nearest)."""
    array = _check_cams(cams)
    mask_list = [np.asarray(m, dtype=bool) for m in (masks if isinstance(masks, list) else list(np.asarray(masks)))]
    if len(mask_list) != len(array):
        raise ValueError(f"{len(array)} CAMs but {len(mask_list)} text masks")
    fitted = np.stack([_fit_mask(m, array.shape[1:]) for m in mask_list]) if mask_list else np.zeros(array.shape)
    return _mass_share(array, fitted)


def cam_attention_summary(
    cams: np.ndarray,
    border_fraction: float = 0.1,
    flag_above: float = CAM_FLAG_ABOVE,
    text_masks: np.ndarray | list[np.ndarray] | None = None,
) -> dict[str, object]:
    """Border (and, given masks, text) share of CAM mass per image, the means, and the counts flagged above flag_above.

    Keys: border_share_mean, border_shares (list), n_border_flagged, flagged_border (indices), n, and with
    text_masks also text_share_mean, text_shares, n_text_flagged, flagged_text. All-zero CAMs count as NaN and
    are left out of the means.
    """
    if not 0 < flag_above < 1:
        raise ValueError(f"flag_above must be in (0, 1), got {flag_above}")
    array = _check_cams(cams)
    summary: dict[str, object] = {"n": int(len(array)), "border_fraction": border_fraction, "flag_above": flag_above}
    parts = {"border": border_shares(array, border_fraction)}
    if text_masks is not None:
        parts["text"] = text_share(array, text_masks)
    for name, shares in parts.items():
        finite = shares[np.isfinite(shares)]
        flagged = np.flatnonzero(np.nan_to_num(shares, nan=0.0) > flag_above)
        summary[f"{name}_share_mean"] = float(finite.mean()) if finite.size else float("nan")
        summary[f"{name}_shares"] = [float(v) for v in shares]
        summary[f"n_{name}_flagged"] = int(flagged.size)
        summary[f"flagged_{name}"] = [int(i) for i in flagged]
    log.info(
        "CAM attention: border share mean %.3f, %d of %d flagged",
        summary["border_share_mean"],
        summary["n_border_flagged"],
        len(array),
    )
    return summary
