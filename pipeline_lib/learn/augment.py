"""Training augmentation: torchvision's transforms in the loader, or whole uint8 batches on any device (the GPU when
training on CUDA) in plain torch ops; resolve_augment_on says which.

The loader path (build_augmentation) augments one image at a time in the DataLoader workers. On a GPU those
CPU workers cannot keep up, so here the workers only draw each sample's parameters (`draw_params`, from the same
per-sample seeded generator and with the same calls, in the same order, as torchvision's transforms in
build_augmentation) and the device applies them to the batch (`apply_params`): one affine warp (affine_grid with
torchvision's grid, nearest, zero fill), horizontal flip, autocontrast, Gaussian blur (per-sample kernel and sigma)
and JPEG re-compression (torchvision.io: nvjpeg on CUDA, libjpeg on the CPU). A sample gets the same parameters
on both paths, and on the CPU the same pixels up to rare rounding at a nearest-neighbour or blur boundary.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812 - torch's own convention
from torchvision.io import decode_jpeg, encode_jpeg
from torchvision.transforms import v2

from pipeline_lib.core import devices
from pipeline_lib.core.config import AugmentConfig

log = logging.getLogger(__name__)

PARAM_NAMES: tuple[str, ...] = (
    "angle",  # degrees, as torchvision's RandomAffine draws it
    "tx",  # whole pixels
    "ty",
    "scale",
    "hflip",  # 1.0 = flip
    "autocontrast",  # 1.0 = apply
    "blur_kernel",  # 0 = no blur, else 3 or 5
    "blur_sigma",
    "jpeg_quality",  # 0 = no re-compression, else 1..100
)
_COLUMN = {name: index for index, name in enumerate(PARAM_NAMES)}
BLUR_KERNELS: tuple[int, ...] = (3, 5)
BLUR_SIGMA: tuple[float, float] = (0.1, 1.5)


def _applied(p: float) -> bool:
    """One Bernoulli draw as torchvision's random-apply transforms make it (skipped when rand >= p)."""
    return not bool(torch.rand(1) >= p)


def draw_params(config: AugmentConfig, height: int, width: int) -> torch.Tensor:
    """One sample's augmentation parameters (float64 [len(PARAM_NAMES)]) from the global torch generator.

    The draws are those of build_augmentation's transforms, in its order: RandomAffine (angle, tx, ty,
    scale), RandomHorizontalFlip, RandomAutocontrast, then blur (apply, kernel, sigma) and JPEG (apply, quality)
    only when enabled. Seeded the same way, both paths augment a sample with the same parameters.
    """
    degrees, translate = config.rotation_degrees, config.affine_translate
    angle = torch.empty(1).uniform_(-float(degrees), float(degrees)).item()
    max_dx, max_dy = float(translate * width), float(translate * height)
    tx = int(round(float(torch.empty(1).uniform_(-max_dx, max_dx).item())))
    ty = int(round(float(torch.empty(1).uniform_(-max_dy, max_dy).item())))
    scale = torch.empty(1).uniform_(config.affine_scale_min, config.affine_scale_max).item()
    hflip = _applied(config.hflip_p)
    autocontrast = _applied(config.autocontrast_p)
    kernel, sigma, quality = 0, 0.0, 0
    if config.blur_p > 0 and _applied(config.blur_p):
        choice = int(torch.multinomial(torch.tensor([1.0 / len(BLUR_KERNELS)] * len(BLUR_KERNELS)), 1))
        kernel = BLUR_KERNELS[choice]
        sigma = torch.empty(1).uniform_(*BLUR_SIGMA).item()
    if config.jpeg_p > 0 and _applied(config.jpeg_p):
        quality = int(torch.randint(config.jpeg_quality_min, config.jpeg_quality_max + 1, ()).item())
    values = [angle, tx, ty, scale, float(hflip), float(autocontrast), kernel, sigma, quality]
    return torch.tensor(values, dtype=torch.float64)


def _column(params: torch.Tensor, name: str) -> torch.Tensor:
    return params[:, _COLUMN[name]]


def inverse_affine_matrices(params: torch.Tensor) -> torch.Tensor:
    """float32 [N, 2, 3]: torchvision's inverse affine matrix (centre (0, 0), no shear) for each sample's angle,
    translation and scale, computed in float64 as torchvision does in Python floats."""
    angle = torch.deg2rad(_column(params, "angle").to(torch.float64))
    tx, ty = _column(params, "tx").to(torch.float64), _column(params, "ty").to(torch.float64)
    scale = _column(params, "scale").to(torch.float64)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # torchvision: [d, -b, 0, -c, a, 0] / scale with a = d = cos, b = -sin, c = sin (no shear)
    m0, m1, m3, m4 = cos / scale, sin / scale, -sin / scale, cos / scale
    m2 = m0 * -tx + m1 * -ty  # inverse translation (the centre is the origin of torchvision's grid)
    m5 = m3 * -tx + m4 * -ty
    return torch.stack([m0, m1, m2, m3, m4, m5], dim=1).to(torch.float32).view(-1, 2, 3)


def affine_grids(theta: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Sampling grids [N, H, W, 2] for pixel-unit matrices theta [N, 2, 3], built as torchvision's _affine_grid."""
    device = theta.device
    base = torch.empty(1, height, width, 3, dtype=torch.float32, device=device)
    base[..., 0].copy_(torch.linspace((1.0 - width) * 0.5, (width - 1.0) * 0.5, steps=width, device=device))
    rows = torch.linspace((1.0 - height) * 0.5, (height - 1.0) * 0.5, steps=height, device=device)
    base[..., 1].copy_(rows.unsqueeze(-1))
    base[..., 2].fill_(1)
    half = torch.tensor([0.5 * width, 0.5 * height], dtype=torch.float32, device=device)
    rescaled = theta.transpose(1, 2) / half
    grid = base.view(1, height * width, 3).expand(len(theta), -1, -1).bmm(rescaled)
    return grid.view(len(theta), height, width, 2)


def warp(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Rotate, translate and scale each uint8 image by its parameters (nearest, zero fill), as RandomAffine does."""
    height, width = images.shape[-2:]
    grid = affine_grids(inverse_affine_matrices(params).to(images.device), height, width)
    moved = F.grid_sample(images.to(torch.float32), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return moved.round_().to(torch.uint8)


def autocontrast(images: torch.Tensor) -> torch.Tensor:
    """Stretch each image's channels to 0..255 (uint8 in and out), computed as torchvision's autocontrast_image."""
    values = images.to(torch.float32)
    minimum = values.amin(dim=(-2, -1), keepdim=True)
    maximum = values.amax(dim=(-2, -1), keepdim=True)
    flat = maximum == minimum
    inv_scale = maximum.sub_(minimum).mul_(1.0 / 255)
    minimum[flat] = 0.0
    inv_scale[flat] = 1.0
    return values.sub_(minimum).div_(inv_scale).clamp_(0, 255).to(torch.uint8)


def gaussian_kernels(kernel_size: int, sigmas: torch.Tensor) -> torch.Tensor:
    """float32 [M, k, k] kernels for sigmas [M], with torchvision's formula (softmax of -(x / sigma)^2)."""
    limit = (kernel_size - 1) / (2.0 * math.sqrt(2.0))
    x = torch.linspace(-limit, limit, steps=kernel_size, dtype=torch.float32, device=sigmas.device)
    one_d = torch.softmax(x.unsqueeze(0).div(sigmas.to(torch.float32).unsqueeze(1)).pow(2).neg(), dim=1)
    return one_d.unsqueeze(2) * one_d.unsqueeze(1)


def blur(images: torch.Tensor, kernel_size: int, sigmas: torch.Tensor) -> torch.Tensor:
    """Gaussian blur of uint8 images [M, 3, H, W], one sigma each (reflect padding, rounded back to uint8)."""
    count, channels = images.shape[:2]
    kernels = gaussian_kernels(kernel_size, sigmas.to(images.device))
    weight = kernels.repeat_interleave(channels, dim=0).unsqueeze(1)  # [M*3, 1, k, k]
    pad = kernel_size // 2
    padded = F.pad(images.to(torch.float32), [pad, pad, pad, pad], mode="reflect")
    output = F.conv2d(padded.view(1, count * channels, *padded.shape[-2:]), weight, groups=count * channels)
    return output.view(count, channels, *images.shape[-2:]).round_().to(torch.uint8)


def jpeg(images: torch.Tensor, quality: int) -> torch.Tensor:
    """JPEG round trip of uint8 images [M, 3, H, W] at one quality, on their device (nvjpeg on CUDA)."""
    encoded = encode_jpeg(list(images), quality=quality)
    decoded = decode_jpeg([data.cpu() for data in encoded], device=images.device)
    return torch.stack(decoded)


def _where(mask: torch.Tensor, changed: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.to(images.device).view(-1, 1, 1, 1), changed, images)


def _blur_selected(images: torch.Tensor, kernel: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur the samples whose kernel is 3 or 5, grouped by kernel size."""
    result = images
    for size in BLUR_KERNELS:
        chosen = torch.nonzero(kernel == size).flatten().to(images.device)
        if len(chosen):
            result = result.index_copy(0, chosen, blur(images.index_select(0, chosen), size, sigma[chosen.cpu()]))
    return result


def _jpeg_selected(images: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """JPEG round trip of the samples whose quality is > 0, grouped by quality."""
    result = images
    for value in sorted({int(q) for q in quality.tolist() if q > 0}):
        chosen = torch.nonzero(quality == value).flatten().to(images.device)
        result = result.index_copy(0, chosen, jpeg(images.index_select(0, chosen), value))
    return result


def apply_params(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Augment a uint8 batch [N, 3, H, W] with per-sample parameters [N, len(PARAM_NAMES)] (from draw_params).

    Order as in build_augmentation: warp, horizontal flip, autocontrast, blur, JPEG. Runs on the images' device;
    the parameters may live anywhere.
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be uint8 [N,3,H,W], got {images.dtype} {list(images.shape)}")
    if params.ndim != 2 or params.shape != (len(images), len(PARAM_NAMES)):
        raise ValueError(f"params must be shaped [{len(images)}, {len(PARAM_NAMES)}], got {list(params.shape)}")
    params = params.detach().cpu()
    if len(images) == 0:
        return images
    result = warp(images, params)
    result = _where(_column(params, "hflip") > 0, result.flip(-1), result)
    result = _where(_column(params, "autocontrast") > 0, autocontrast(result), result)
    result = _blur_selected(result, _column(params, "blur_kernel"), _column(params, "blur_sigma"))
    return _jpeg_selected(result, _column(params, "jpeg_quality"))


def jpeg_works_on(device: str) -> bool:
    """Whether torchvision can JPEG-encode and decode on device (nvjpeg on CUDA); False with the reason logged."""
    probe = torch.zeros(1, 3, 16, 16, dtype=torch.uint8, device=device)
    try:
        jpeg(probe, 90)
    except (RuntimeError, NotImplementedError) as error:
        log.warning("JPEG re-compression cannot run on %s (%s): augmenting in the loader workers", device, error)
        return False
    return True


def resolve_augment_on(augment_on: str, device: str, config: AugmentConfig) -> str:
    """'device' or 'loader': auto augments on a CUDA device, in the loader elsewhere (or where JPEG cannot run)."""
    if augment_on not in ("auto", "loader", "device"):
        raise ValueError(f"train.augment_on must be auto, loader or device, got {augment_on!r}")
    if augment_on != "auto":
        return augment_on
    if not devices.is_cuda(device):
        return "loader"
    return "device" if config.jpeg_p == 0 or jpeg_works_on(device) else "loader"


def build_augmentation(config: AugmentConfig) -> v2.Compose:
    """On uint8 CHW tensors: rotation+translate+scale (one affine), h-flip, autocontrast, optional blur and JPEG."""
    if config.affine_scale_min > config.affine_scale_max:
        raise ValueError(
            f"train.augment.affine_scale_min ({config.affine_scale_min}) must be <= "
            f"affine_scale_max ({config.affine_scale_max})"
        )
    if config.jpeg_quality_min > config.jpeg_quality_max:
        raise ValueError(
            f"train.augment.jpeg_quality_min ({config.jpeg_quality_min}) must be <= "
            f"jpeg_quality_max ({config.jpeg_quality_max})"
        )
    t = config.affine_translate
    # The recipe's RandomRotation and RandomAffine as one warp: the same mapping of pixels as a rotation followed
    # by a translate/scale (uniform scaling commutes with rotation), one interpolation instead of two, and half the
    # per-sample cost. One difference: where the shift or a zoom-out shows what the separate rotation had cut off
    # at the frame, the single warp shows those pixels instead of black. The flip after the warp gives the same
    # distribution (the translation range is symmetric).
    steps: list[nn.Module] = [
        v2.RandomAffine(
            config.rotation_degrees, translate=(t, t), scale=(config.affine_scale_min, config.affine_scale_max)
        ),
        v2.RandomHorizontalFlip(config.hflip_p),
        v2.RandomAutocontrast(config.autocontrast_p),
    ]
    # Degradations real photos go through; only added when enabled so p=0 leaves the random stream unchanged.
    if config.blur_p > 0:
        blurs = [v2.GaussianBlur(kernel, sigma=BLUR_SIGMA) for kernel in BLUR_KERNELS]
        steps.append(v2.RandomApply([v2.RandomChoice(blurs)], p=config.blur_p))
    if config.jpeg_p > 0:
        jpeg = v2.JPEG(quality=(config.jpeg_quality_min, config.jpeg_quality_max))
        steps.append(v2.RandomApply([jpeg], p=config.jpeg_p))
    return v2.Compose(steps)


class ParamDraw:
    """Draws one sample's augmentation parameters in a loader worker (picklable for spawned workers)."""

    def __init__(self, config: AugmentConfig) -> None:
        build_augmentation(config)  # the same checks as the loader path
        self.config = config

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return draw_params(self.config, int(image.shape[-2]), int(image.shape[-1]))
