"""Tests for pipeline_lib.learn.features: the per-image feature cache (hits, misses, damaged files, keys)."""

from __future__ import annotations

import functools
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pipeline_lib.core.code_index import PROJECT_ROOT, CodeIndex
from pipeline_lib.core.workspace import Workspace, put_in_store
from pipeline_lib.learn import features, models
from pipeline_lib.learn.preprocess import decode_image
from tests.conftest import make_image

SIZE = 16


def _tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))


def _tiny_load(path: Path, sha256: str, size: int = SIZE) -> np.ndarray:
    return decode_image(path, size, None, sha256)


def _tiny_forward(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(batch.float() / 255.0)


class _Counting:
    """A load function that counts the files it decodes (what the cache had to compute)."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def __call__(self, path: Path, sha256: str) -> np.ndarray:
        self.seen.append(sha256)
        return _tiny_load(path, sha256)


def _extractor(model: nn.Module | None = None, name: str = "tiny:test", weights: str = "w0", load=None):
    return features.Extractor(
        name=name,
        identity={"weights": weights, "image_size": str(SIZE)},
        producers=(_tiny_load, _tiny_forward),
        model=model if model is not None else _tiny_model(),
        load=load or _tiny_load,
        forward=_tiny_forward,
        dim=5,
        batch_size=2,
    )


def _images(workspace: Workspace, tmp_path: Path, seeds: range) -> dict[str, Path]:
    """sha256 -> stored file of small generated images."""
    found = {}
    for seed in seeds:
        data = make_image(tmp_path / "made" / f"{seed}.jpg", seed=seed).read_bytes()
        sha, path = put_in_store(workspace, data, "jpg")
        found[sha] = path
    return found


@pytest.fixture
def index() -> CodeIndex:
    return CodeIndex()


def test_first_call_computes_all_then_everything_comes_from_the_cache(
    workspace: Workspace, tmp_path: Path, index: CodeIndex
) -> None:
    images = _images(workspace, tmp_path, range(5))
    counting = _Counting()
    first = features.embed(workspace, _extractor(load=counting), images, index=index)
    assert (first.computed, first.reused) == (5, 0), "an empty cache computes every image"
    assert first.matrix.shape == (5, 5) and first.matrix.dtype == np.float32
    assert sorted(counting.seen) == sorted(images)
    again = _Counting()
    second = features.embed(workspace, _extractor(load=again), dict(reversed(list(images.items()))), index=index)
    assert (second.computed, second.reused) == (0, 5) and again.seen == [], "a second call must decode nothing"
    assert second.shas == tuple(reversed(first.shas)), "rows come in the asked order"
    np.testing.assert_array_equal(second.matrix, first.matrix[::-1])
    stored = features.feature_path(workspace, first.key, first.shas[0])
    assert stored.is_file() and stored.parent.name == first.shas[0][:2]
    about = json.loads((workspace.cache / "features" / first.key / features.ABOUT_FILE).read_text())
    assert about["name"] == "tiny:test" and about["key_parts"]["identity.weights"] == "w0"


def test_a_new_image_embeds_only_it(workspace: Workspace, tmp_path: Path, index: CodeIndex) -> None:
    images = _images(workspace, tmp_path, range(4))
    features.embed(workspace, _extractor(), dict(list(images.items())[:3]), index=index)
    counting = _Counting()
    result = features.embed(workspace, _extractor(load=counting), images, index=index)
    assert (result.computed, result.reused) == (1, 3)
    assert counting.seen == [list(images)[3]], "only the image not embedded before is decoded"


def test_features_equal_what_the_model_computes(workspace: Workspace, tmp_path: Path, index: CodeIndex) -> None:
    images = _images(workspace, tmp_path, range(3))
    model = _tiny_model()
    result = features.embed(workspace, _extractor(model), images, index=index)
    batch = torch.from_numpy(np.stack([_tiny_load(path, sha) for sha, path in images.items()]))
    with torch.inference_mode():
        expected = _tiny_forward(model.eval(), batch).numpy()
    np.testing.assert_allclose(result.matrix, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "change",
    [
        {"name": "tiny:other"},  # a new model
        {"weights": "w1"},  # changed identity (e.g. other weights)
    ],
)
def test_a_new_model_or_identity_embeds_everything_again(
    workspace: Workspace, tmp_path: Path, index: CodeIndex, change: dict[str, str]
) -> None:
    images = _images(workspace, tmp_path, range(3))
    before = features.embed(workspace, _extractor(), images, index=index)
    after = features.embed(workspace, _extractor(**change), images, index=index)
    assert after.key != before.key, f"{change} must give a new cache folder"
    assert (after.computed, after.reused) == (3, 0), f"{change} must embed every image again"


def test_changed_producer_code_embeds_everything_again(workspace: Workspace, tmp_path: Path) -> None:
    images = _images(workspace, tmp_path, range(3))
    project = tmp_path / "project"
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(PROJECT_ROOT / "pipeline_lib", project / "pipeline_lib", ignore=ignore)
    extractor = features.classifier_extractor(models.Classifier("resnet18"), "resnet18:random", 32)
    before = features.embed(workspace, extractor, images, index=CodeIndex(project))
    same = features.embed(workspace, extractor, images, index=CodeIndex(project))
    assert same.computed == 0, "unchanged code reuses the cache"
    preprocess = project / "pipeline_lib" / "learn" / "preprocess.py"
    text = preprocess.read_text(encoding="utf-8")
    edited = text.replace("Image.Resampling.BILINEAR", "Image.Resampling.BICUBIC")
    assert edited != text, "the test edits the resize that decode_image uses"
    preprocess.write_text(edited, encoding="utf-8")
    after = features.embed(workspace, extractor, images, index=CodeIndex(project))
    assert after.key != before.key and (after.computed, after.reused) == (3, 0), "an edit of decoding code counts"
    (project / "pipeline_lib" / "assess" / "report.py").write_text("X = 1\n", encoding="utf-8")
    unrelated = features.embed(workspace, extractor, images, index=CodeIndex(project))
    assert unrelated.key == after.key and unrelated.computed == 0, "code the extractor never reaches does not count"


@pytest.mark.parametrize(
    "damage",
    [
        lambda path: path.write_bytes(path.read_bytes()[:40]),  # cut off
        lambda path: path.write_bytes(b"not an npy file"),
        lambda path: np.save(path, np.zeros(3, dtype=np.float32)),  # wrong length
        lambda path: np.save(path, np.full(5, np.nan, dtype=np.float32)),  # not finite
    ],
    ids=["truncated", "garbage", "wrong-shape", "nan"],
)
def test_a_damaged_file_is_recomputed_with_a_warning(
    workspace: Workspace, tmp_path: Path, index: CodeIndex, caplog: pytest.LogCaptureFixture, damage
) -> None:
    images = _images(workspace, tmp_path, range(3))
    first = features.embed(workspace, _extractor(), images, index=index)
    victim = first.shas[1]
    damage(features.feature_path(workspace, first.key, victim))
    counting = _Counting()
    with caplog.at_level(logging.WARNING, logger="pipeline_lib.learn.features"):
        again = features.embed(workspace, _extractor(load=counting), images, index=index)
    assert counting.seen == [victim] and (again.computed, again.reused) == (1, 2), "only the damaged file recomputed"
    assert any(victim in record.getMessage() for record in caplog.records), "the warning names the damaged file"
    np.testing.assert_allclose(again.matrix, first.matrix, rtol=1e-6)
    assert features.embed(workspace, _extractor(), images, index=index).computed == 0, "the repaired file is reused"


def test_an_unreadable_image_is_named_and_nothing_of_its_batch_is_stored(
    workspace: Workspace, tmp_path: Path, index: CodeIndex
) -> None:
    images = _images(workspace, tmp_path, range(2))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    images["ab" * 32] = broken
    with pytest.raises(features.FeatureError, match="broken.jpg"):
        features.embed(workspace, _extractor(), images, index=index)
    key = features.cache_key(_extractor(), index)
    assert not features.feature_path(workspace, key, "ab" * 32).exists()


def test_a_classifier_extractor_gives_its_penultimate_and_first_stage_features_and_leaves_the_model_as_it_was(
    workspace: Workspace, tmp_path: Path, index: CodeIndex
) -> None:
    images = _images(workspace, tmp_path, range(2))
    model = models.Classifier("resnet18").train()
    extractor = features.classifier_extractor(model, "champion:aidetect/1", 32)
    assert extractor.dim == 512 + 64 and extractor.identity["weights"] == features.state_digest(model)
    blocks = extractor.block_slices()
    assert blocks == {features.PENULTIMATE: slice(0, 512), "first_stage": slice(512, 576)}
    result = features.embed(workspace, extractor, images, index=index)
    assert model.training, "the caller's model is back in training mode"
    batch = torch.from_numpy(np.stack([decode_image(path, 32, None, sha) for sha, path in images.items()]))
    with torch.inference_mode():
        x = batch.float() / 255.0
        penultimate = model.eval().features(x).numpy()
        backbone = model.backbone
        early = backbone.layer1(
            backbone.maxpool(backbone.relu(backbone.bn1(backbone.conv1((x - model.mean) / model.std))))
        )
    np.testing.assert_allclose(result.matrix[:, blocks[features.PENULTIMATE]], penultimate, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        result.matrix[:, blocks["first_stage"]], early.mean(dim=(2, 3)).numpy(), rtol=1e-4, atol=1e-5
    )
    other = features.classifier_extractor(models.Classifier("resnet18"), "champion:aidetect/1", 32)
    assert features.cache_key(other, index) != result.key, "other weights under the same name are another model"
    bigger = features.classifier_extractor(model, "champion:aidetect/1", 48)
    assert features.cache_key(bigger, index) != result.key, "another input size is another cache"


def test_an_empty_request_and_bad_descriptions(workspace: Workspace, index: CodeIndex) -> None:
    empty = features.embed(workspace, _extractor(), {}, index=index)
    assert empty.matrix.shape == (0, 5) and (empty.computed, empty.reused) == (0, 0)
    with pytest.raises(ValueError, match="producing code"):
        features.Extractor("x", {}, (), _tiny_model(), _tiny_load, _tiny_forward, dim=5)
    with pytest.raises(ValueError, match="do not add up"):
        features.Extractor("x", {}, (_tiny_load,), _tiny_model(), _tiny_load, _tiny_forward, dim=5, blocks=(("a", 4),))
    with pytest.raises(TypeError, match="Classifier"):
        features.classifier_extractor(_tiny_model(), "x", 32)  # type: ignore[arg-type]
    wrong = functools.partial(features.Extractor, "x", {}, (_tiny_load,), _tiny_model(), _tiny_load, _tiny_forward)
    with pytest.raises(features.FeatureError, match=r"shaped \[1, 5\], expected \[1, 7\]"):
        features.embed(workspace, wrong(dim=7), {"ab" * 32: make_image(workspace.root / "x.jpg")}, index=index)
