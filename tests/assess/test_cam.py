"""Tests for pipeline_lib.assess.cam: CAM maps of every method, on frozen models, per-image targets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline_lib.assess.cam import CAM_METHODS, compute_cams
from tests.assess.conftest import random_images
from tests.conftest import TinyClassifier


def test_compute_cams_shape_range_and_dtype(model: TinyClassifier) -> None:
    images = random_images(8, 64)
    cams = compute_cams(model, images, model.net.layer4[-1], batch_size=3)
    assert cams.shape == (8, 64, 64), f"expected one 64x64 map per image, got {cams.shape}"
    assert cams.dtype == np.float32, f"maps should be float32, got {cams.dtype}"
    assert np.isfinite(cams).all() and cams.min() >= 0.0 and cams.max() <= 1.0, "maps must lie in [0, 1]"


def test_compute_cams_works_on_frozen_model_and_leaves_it_as_given(model: TinyClassifier) -> None:
    images = random_images(2, 64, seed=1)
    layer = model.net.layer4[-1]
    expected = compute_cams(model, images, layer)
    for param in model.parameters():
        param.requires_grad_(False)
    model.train()
    try:
        with torch.inference_mode():
            frozen = compute_cams(model, images, layer)
        flags = {p.requires_grad for p in model.parameters()}
        assert flags == {False}, "compute_cams must restore requires_grad=False on a frozen model"
        assert model.training, "compute_cams must give the model back in train mode when it got it so"
    finally:
        for param in model.parameters():
            param.requires_grad_(True)
        model.eval()
    np.testing.assert_allclose(frozen, expected, atol=1e-5, err_msg="a frozen model gave other Grad-CAM maps")
    leftover = [m for m in model.modules() if m._forward_hooks or m._backward_hooks]
    assert leftover == [], f"compute_cams left hooks on {len(leftover)} modules"
    assert all(p.grad is None for p in model.parameters()), "compute_cams left gradients on the parameters"


@pytest.mark.parametrize("method", sorted(CAM_METHODS))
def test_every_registered_cam_method_runs(model: TinyClassifier, method: str) -> None:
    cams = compute_cams(model, random_images(2, 32, seed=2), model.net.layer3[-1], method=method)
    assert cams.shape == (2, 32, 32), f"{method} gave shape {cams.shape}"
    assert np.isfinite(cams).all() and cams.min() >= 0.0 and cams.max() <= 1.0, f"{method} maps outside [0, 1]"


def test_compute_cams_rejects_unknown_method(model: TinyClassifier) -> None:
    with pytest.raises(ValueError, match="gradcam"):
        compute_cams(model, random_images(1, 32), model.net.layer4[-1], method="layercam")


def test_compute_cams_does_not_depend_on_batch_size(model: TinyClassifier) -> None:
    images = random_images(5, 32, seed=3)
    layer = model.net.layer4[-1]
    one_batch = compute_cams(model, images, layer, batch_size=5)
    small = compute_cams(model, images, layer, batch_size=2)
    np.testing.assert_allclose(small, one_batch, atol=1e-5, err_msg="CAM maps depend on the batch size")


def test_per_image_targets_differ_from_one_target(model: TinyClassifier) -> None:
    images = random_images(2, 96, seed=5)
    layer = model.net.layer4[-1]
    mixed = compute_cams(model, images, layer, target_class=[0, 1])
    assert not np.allclose(mixed[0], compute_cams(model, images[:1], layer, target_class=1)[0], atol=1e-3)
    np.testing.assert_allclose(mixed[0], compute_cams(model, images[:1], layer, target_class=0)[0], atol=1e-5)
    np.testing.assert_allclose(mixed[1], compute_cams(model, images[1:], layer, target_class=1)[0], atol=1e-5)
    with pytest.raises(ValueError, match="one class per image"):
        compute_cams(model, images, layer, target_class=[0])


@pytest.mark.parametrize("name", ["clip_vit_b16", "dinov2_vits14"])
def test_vit_cams_have_the_image_shape(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline_lib.learn import models
    from tests.tiny_backbones import CLIP_SIZE, DINO_SIZE, use_tiny_backbones

    use_tiny_backbones(monkeypatch)
    torch.manual_seed(0)
    model = models.Classifier(name).eval()
    size = CLIP_SIZE if name.startswith("clip") else DINO_SIZE
    images = random_images(3, size, seed=2)
    layer, reshape = models.target_layer(model), models.cam_reshape(model)
    cams = compute_cams(model, images, layer, batch_size=2, target_class=[0, 1, 1], reshape_transform=reshape)
    assert cams.shape == (3, size, size), f"a ViT's maps must be scaled to the image, got {cams.shape}"
    assert np.isfinite(cams).all() and cams.min() >= 0.0 and cams.max() <= 1.0
    assert cams.std() > 0, "the patch grid must give a map that varies over the image"
    with pytest.raises(Exception):  # noqa: B017 - without the reshape the token sequence is no image
        compute_cams(model, images, layer)
