"""Tests for pipeline_lib.learn.augment: the batched (GPU) augmentation against the loader path (torchvision
transforms).

Everything runs on the CPU device here; tests/learn/test_train_cuda.py compares the CUDA device with the CPU.
"""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats
from torchvision.transforms import v2

from pipeline_lib.core.config import AugmentConfig
from pipeline_lib.learn import augment
from pipeline_lib.learn.augment import build_augmentation

CONFIGS = {
    "recipe": AugmentConfig(),
    "degradations": AugmentConfig(blur_p=0.6, jpeg_p=0.5, jpeg_quality_min=40, jpeg_quality_max=90),
    "wide": AugmentConfig(
        rotation_degrees=45,
        affine_translate=0.3,
        affine_scale_min=0.6,
        affine_scale_max=1.4,
        hflip_p=0.3,
        autocontrast_p=0.8,
        blur_p=1.0,
    ),
}
HEIGHT, WIDTH = 36, 44  # not square: catches swapped axes


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Thousands of tiny per-image ops: one intra-op thread (a thread pool on a loaded machine costs 10x)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _photos(n: int, seed: int = 0) -> torch.Tensor:
    """Photo-like uint8 images [n, 3, H, W]: smooth colour blobs of a random contrast range, plus pixel noise."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        low = int(rng.integers(40, 100))
        base = rng.integers(low, low + 120, size=(4, 5, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(base).resize((WIDTH, HEIGHT), Image.Resampling.BICUBIC), dtype=np.int16)
        noisy = np.clip(smooth + rng.integers(-12, 13, size=smooth.shape), 0, 255).astype(np.uint8)
        images.append(torch.from_numpy(noisy).permute(2, 0, 1))
    return torch.stack(images)


def _loader_path(config: AugmentConfig, image: torch.Tensor, seeds: range) -> torch.Tensor:
    """The loader path: build_augmentation applied to one image under each per-sample seed."""
    transform = build_augmentation(config)
    outputs = []
    for seed in seeds:
        torch.default_generator.manual_seed(seed)
        outputs.append(transform(image))
    return torch.stack(outputs)


def _params(config: AugmentConfig, seeds: range) -> torch.Tensor:
    """The device path's parameters under each per-sample seed (what a loader worker draws)."""
    rows = []
    for seed in seeds:
        torch.default_generator.manual_seed(seed)
        rows.append(augment.draw_params(config, HEIGHT, WIDTH))
    return torch.stack(rows)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_same_seed_gives_the_loader_paths_pixels(name: str) -> None:
    config, images = CONFIGS[name], _photos(24)
    with torch.random.fork_rng(devices=[]):
        expected = torch.stack([_loader_path(config, image, range(i, i + 1))[0] for i, image in enumerate(images)])
        params = _params(config, range(len(images)))
    assert torch.equal(augment.apply_params(images, params), expected)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_parameters_follow_torchvisions_distributions(name: str) -> None:
    config, n = CONFIGS[name], 2000
    with torch.random.fork_rng(devices=[]):
        ours = _params(config, range(n)).numpy()
        torch.manual_seed(12345)  # torchvision's own draws, on another stream
        affine = v2.RandomAffine(
            config.rotation_degrees,
            translate=(config.affine_translate,) * 2,
            scale=(config.affine_scale_min, config.affine_scale_max),
        )
        probe = torch.zeros(3, HEIGHT, WIDTH, dtype=torch.uint8)
        theirs = [affine.make_params([probe]) for _ in range(n)]
        sigmas = [v2.GaussianBlur(3, sigma=augment.BLUR_SIGMA).make_params([probe])["sigma"][0] for _ in range(n)]
    columns = {column: ours[:, index] for index, column in enumerate(augment.PARAM_NAMES)}
    reference = {
        "angle": [p["angle"] for p in theirs],
        "tx": [p["translate"][0] for p in theirs],
        "ty": [p["translate"][1] for p in theirs],
        "scale": [p["scale"] for p in theirs],
    }
    for column, values in reference.items():
        assert stats.ks_2samp(columns[column], values).pvalue > 0.01, column
        assert set(np.unique(columns[column])) <= set(np.unique(values)) or column in ("angle", "scale"), column
    for column, p in (("hflip", config.hflip_p), ("autocontrast", config.autocontrast_p)):
        assert abs(columns[column].mean() - p) < 4 * np.sqrt(p * (1 - p) / n) + 1e-9, column
    blurred = columns["blur_kernel"] > 0
    assert abs(blurred.mean() - config.blur_p) < 4 * np.sqrt(config.blur_p * (1 - config.blur_p) / n) + 1e-9
    if config.blur_p > 0:
        assert set(np.unique(columns["blur_kernel"][blurred])) == set(augment.BLUR_KERNELS)
        assert stats.ks_2samp(columns["blur_sigma"][blurred], sigmas).pvalue > 0.01
    quality = columns["jpeg_quality"][columns["jpeg_quality"] > 0]
    assert abs(len(quality) / n - config.jpeg_p) < 4 * np.sqrt(config.jpeg_p * (1 - config.jpeg_p) / n) + 1e-9
    if len(quality):
        assert quality.min() >= config.jpeg_quality_min and quality.max() <= config.jpeg_quality_max
        uniform = np.arange(config.jpeg_quality_min, config.jpeg_quality_max + 1)
        assert abs(quality.mean() - uniform.mean()) < 4 * uniform.std() / np.sqrt(len(quality))


def _output_statistics(outputs: torch.Tensor, original: torch.Tensor) -> dict[str, np.ndarray]:
    """Per augmented copy of original: value mean and spread, black fill overall, in the corners and its diagonal
    balance (rotation), left-right and top-bottom balance, edge energy (blur, JPEG), distance to the original and to
    its mirror image."""
    values, source = outputs.float(), original.float()
    half_w, half_h = values.shape[-1] // 2, values.shape[-2] // 2
    black = (outputs < 8).all(dim=1).float()  # fill, also after JPEG (the photos' own values start at 40)
    corner_h, corner_w = values.shape[-2] // 5, values.shape[-1] // 5

    def each(part: torch.Tensor) -> np.ndarray:
        return part.mean(dim=tuple(range(1, part.ndim))).numpy()

    top_left, top_right = each(black[:, :corner_h, :corner_w]), each(black[:, :corner_h, -corner_w:])
    bottom_left, bottom_right = each(black[:, -corner_h:, :corner_w]), each(black[:, -corner_h:, -corner_w:])
    return {
        "mean": each(values),
        "std": values.std(dim=(1, 2, 3)).numpy(),
        "black_share": each(black),
        "corner_black_share": (top_left + top_right + bottom_left + bottom_right) / 4,
        "diagonal_black_balance": (top_left + bottom_right) - (top_right + bottom_left),  # rotation; shifts cancel
        "left_minus_right": each(values[..., :half_w]) - each(values[..., half_w:]),
        "top_minus_bottom": each(values[..., :half_h, :]) - each(values[..., half_h:, :]),
        "edge_energy": each(values.diff(dim=-1).abs()),
        "distance_to_original": each((values - source).abs()),
        "distance_to_mirror": each((values - source.flip(-1)).abs()),
    }


@pytest.mark.parametrize("name", ["degradations", "wide"])
def test_outputs_on_a_fixed_batch_have_the_same_statistics(name: str) -> None:
    config, images, draws = CONFIGS[name], _photos(4, seed=7), 500
    with torch.random.fork_rng(devices=[]):
        for number, image in enumerate(images):
            loader = _loader_path(config, image, range(number * draws, (number + 1) * draws))
            params = _params(config, range(10**6 + number * draws, 10**6 + (number + 1) * draws))  # other seeds
            device = augment.apply_params(image.expand(draws, -1, -1, -1).contiguous(), params)
            ours, theirs = _output_statistics(device, image), _output_statistics(loader, image)
            for statistic in ours:
                result = stats.ks_2samp(ours[statistic], theirs[statistic])
                assert result.pvalue > 0.001, f"image {number} {statistic}: {result}"


def test_identity_parameters_and_input_checks() -> None:
    images = _photos(3)
    identity = torch.tensor([[0.0, 0, 0, 1.0, 0, 0, 0, 0.0, 0]] * 3, dtype=torch.float64)
    assert torch.equal(augment.apply_params(images, identity), images)
    flipped = identity.clone()
    flipped[1, augment.PARAM_NAMES.index("hflip")] = 1.0
    out = augment.apply_params(images, flipped)
    assert torch.equal(out[1], images[1].flip(-1)) and torch.equal(out[0], images[0])
    assert augment.apply_params(images[:0], identity[:0]).shape == (0, 3, HEIGHT, WIDTH)
    with pytest.raises(ValueError, match="uint8"):
        augment.apply_params(images.float(), identity)
    with pytest.raises(ValueError, match="params must be shaped"):
        augment.apply_params(images, identity[:2])
    assert augment.jpeg_works_on("cpu")


def test_loader_augmentation_is_seeded_and_keeps_dtype() -> None:
    augment = build_augmentation(AugmentConfig())
    images = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(5)
    first = augment(images)
    torch.manual_seed(5)
    assert torch.equal(first, augment(images)) and first.dtype == torch.uint8 and first.shape == images.shape
    with pytest.raises(ValueError, match="affine_scale_min"):
        build_augmentation(AugmentConfig(affine_scale_min=1.2, affine_scale_max=1.0))


def test_blur_and_jpeg_augmentation() -> None:
    images = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    assert len(build_augmentation(AugmentConfig()).transforms) == 3  # p=0: the recipe is unchanged
    plain = AugmentConfig(rotation_degrees=0, hflip_p=0, autocontrast_p=0, affine_translate=0)
    identity = build_augmentation(plain.model_copy(update={"affine_scale_min": 1, "affine_scale_max": 1}))
    degraded = build_augmentation(
        plain.model_copy(update={"affine_scale_min": 1, "affine_scale_max": 1, "blur_p": 1.0, "jpeg_p": 1.0})
    )
    assert torch.equal(identity(images), images)
    torch.manual_seed(3)
    first = degraded(images)
    torch.manual_seed(3)
    assert torch.equal(first, degraded(images)) and first.dtype == torch.uint8 and first.shape == images.shape
    assert not torch.equal(first, images)
    # Blur smooths noise: neighbouring pixels get closer.
    assert first.float().diff(dim=2).abs().mean() < images.float().diff(dim=2).abs().mean()
    jpeg_only = build_augmentation(
        plain.model_copy(
            update={
                "affine_scale_min": 1,
                "affine_scale_max": 1,
                "jpeg_p": 1.0,
                "jpeg_quality_min": 10,
                "jpeg_quality_max": 10,
            }
        )
    )
    buffer = io.BytesIO()
    Image.fromarray(images.permute(1, 2, 0).numpy()).save(buffer, "JPEG", quality=10)
    reference = torch.from_numpy(np.array(Image.open(buffer))).permute(2, 0, 1)
    assert (jpeg_only(images).int() - reference.int()).abs().float().mean() < 3  # a real quality-10 JPEG round trip
    with pytest.raises(ValueError, match="jpeg_quality_min"):
        build_augmentation(
            AugmentConfig.model_construct(**{**plain.model_dump(), "jpeg_quality_min": 90, "jpeg_quality_max": 80})
        )
