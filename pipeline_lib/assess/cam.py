"""Grad-CAM maps: which class they explain, computing them in batches on a device, their attention summary, and
the heat map drawn over an image (as PNG)."""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image
from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, ScoreCAM
from pytorch_grad_cam.base_cam import BaseCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from pipeline_lib.assess.cam_summary import CAM_FLAG_ABOVE, cam_attention_summary, text_mask
from pipeline_lib.assess.evaluate import CLASS_NAMES, borrowed_model, check_images, to_float
from pipeline_lib.core.progress import progress

log = logging.getLogger(__name__)

CAM_METHODS: dict[str, type[BaseCAM]] = {
    "gradcam": GradCAM,
    "gradcam++": GradCAMPlusPlus,
    "eigencam": EigenCAM,
    "scorecam": ScoreCAM,
}
CAM_TARGETS: dict[str, str] = {  # report.cam_target -> how the report says it
    "predicted": "each image's predicted class",
    "ai": "the \u201cai\u201d class",
    "real": "the \u201creal\u201d class",
}
CAM_BORDER_FRACTION = 0.1


def compute_cams(
    model: torch.nn.Module,
    images: torch.Tensor,
    target_layer: torch.nn.Module,
    method: str = "gradcam",
    batch_size: int = 16,
    target_class: int | Sequence[int] = 1,
    device: str = "cpu",
    reshape_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> np.ndarray:
    """CAM maps float32 [N, H, W] in [0, 1] explaining target_class (1 = ai, 0 = real), or one class index per
    image; the model is left as given. reshape_transform: turns target_layer's output into [N, C, h, w] (a vision
    transformer's tokens into the patch grid: learn.models.cam_reshape)."""
    check_images(images)
    if method not in CAM_METHODS:
        raise ValueError(f"report.cam_method must be one of {', '.join(CAM_METHODS)}, got {method!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    classes = [target_class] * len(images) if isinstance(target_class, int) else [int(c) for c in target_class]
    if len(classes) != len(images):
        raise ValueError(f"target_class must hold one class per image ({len(images)}), got {len(classes)}")
    if any(c < 0 for c in classes):
        raise ValueError(f"target_class must be a class index >= 0 (0 = real, 1 = ai), got {target_class}")
    height, width = images.shape[-2:]
    if len(images) == 0:
        return np.empty((0, height, width), dtype=np.float32)
    maps: list[np.ndarray] = []
    # Gradients must flow even if the caller froze the backbone or is inside inference_mode.
    with torch.inference_mode(False), torch.enable_grad(), borrowed_model(model, device, requires_grad=True):
        with CAM_METHODS[method](
            model=model, target_layers=[target_layer], reshape_transform=reshape_transform
        ) as cam:
            starts = range(0, len(images), batch_size)
            for start in progress(starts, len(images), method, step=batch_size):
                batch = to_float(images[start : start + batch_size], device)
                targets = [ClassifierOutputTarget(c) for c in classes[start : start + batch_size]]
                maps.append(np.asarray(cam(input_tensor=batch, targets=targets), dtype=np.float32))
    log.debug("computed %s maps for %d images", method, len(images))
    return np.clip(np.nan_to_num(np.concatenate(maps), nan=0.0), 0.0, 1.0)


def cam_attention_metrics(
    model: torch.nn.Module,
    images: torch.Tensor,
    target_layer: torch.nn.Module,
    method: str = "gradcam",
    batch_size: int = 16,
    flag_above: float = CAM_FLAG_ABOVE,
    device: str = "cpu",
    reshape_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:
    """CAM attention over images: cam.border_share_mean, cam.text_share_mean, cam.n_border_flagged, ... (floats).

    The share of each image's CAM mass (explaining "ai") on the border band and on text-like regions; an image is
    flagged when a share exceeds flag_above. A uniform map puts 0.36 of its mass on the border. The CAMs are
    computed on device in batches; the text masks (an image heuristic) on the CPU.
    """
    check_images(images)
    if len(images) == 0:
        return {"cam.n": 0.0}
    cams = compute_cams(
        model, images, target_layer, method=method, batch_size=batch_size, device=device,
        reshape_transform=reshape_transform,
    )  # fmt: skip
    masks = [text_mask(np.ascontiguousarray(image.permute(1, 2, 0).cpu().numpy())) for image in images]
    summary = cam_attention_summary(cams, CAM_BORDER_FRACTION, flag_above, text_masks=masks)
    keys = ("border_share_mean", "text_share_mean", "n_border_flagged", "n_text_flagged", "n", "flag_above")
    return {f"cam.{key}": float(summary[key]) for key in keys}


def png_bytes(array: np.ndarray) -> bytes:
    """Encode an HxWx3 uint8 array as PNG."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def cam_overlay(image: torch.Tensor, cam: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(original HxWx3 uint8, CAM heat map blended over it HxWx3 uint8) for one uint8 CHW image."""
    rgb = image.permute(1, 2, 0).cpu().numpy()
    overlay = show_cam_on_image(rgb.astype(np.float32) / 255.0, cam, use_rgb=True)
    return rgb, overlay


def cam_classes(selected: pd.DataFrame, cam_target: str) -> list[int]:
    """The class index each selected row's CAM explains: its predicted class, or always ai or real (cam_target)."""
    if cam_target not in CAM_TARGETS:
        raise ValueError(f"report.cam_target must be one of {', '.join(CAM_TARGETS)}, got {cam_target!r}")
    if cam_target != "predicted":
        return [CLASS_NAMES.index(cam_target)] * len(selected)
    return [CLASS_NAMES.index(str(label)) for label in selected["predicted"]]
