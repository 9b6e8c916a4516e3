"""Tests for pipeline_lib.learn.models: building, weights, Grad-CAM layer and checkpoints (resnet18, tiny inputs)."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest
import torch
import torchvision

from pipeline_lib.core.workspace import file_sha256
from pipeline_lib.learn import models
from tests.loopback import closed_port_url, serve_files


def _images(n: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_build_none_forward_shape() -> None:
    model, info = models.build_model("resnet18", "none")
    assert info == models.WeightsInfo("none", "")
    assert isinstance(model, models.Classifier)
    assert model.classes == ("real", "ai")
    logits = model.eval()(_images(3))
    assert logits.shape == (3, 2)
    assert torch.isfinite(logits).all()


def test_parameter_groups_partition_the_model() -> None:
    model, _ = models.build_model("resnet18", "none")
    head = {id(p) for p in model.head_parameters()}
    backbone = {id(p) for p in model.backbone_parameters()}
    assert head and backbone and not head & backbone
    assert head | backbone == {id(p) for p in model.parameters()}
    assert model.head.out_features == 2


def test_normalisation_is_internal_and_not_saved() -> None:
    model, _ = models.build_model("resnet18", "none")
    assert torch.allclose(model.mean.flatten(), torch.tensor(models.IMAGENET_MEAN))
    assert "mean" not in model.state_dict() and "std" not in model.state_dict()
    with pytest.raises(TypeError, match="float"):
        model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def test_unknown_model_name() -> None:
    with pytest.raises(ValueError, match="resnet18"):
        models.build_model("vgg11", "none")


def test_imagenet_weights_missing_names_path_url_and_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    expected = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert models.imagenet_weights_path("resnet18") == expected
    assert models.imagenet_weights_url("resnet18") == torchvision.models.ResNet18_Weights.DEFAULT.url
    with pytest.raises(models.WeightsNotFoundError) as caught:
        models.build_model("resnet18", "imagenet")
    assert isinstance(caught.value, FileNotFoundError)
    message = str(caught.value)
    assert str(expected) in message and "weights=none" in message
    assert torchvision.models.ResNet18_Weights.DEFAULT.url in message and "aidetect weights fetch resnet18" in message


def test_imagenet_weights_from_local_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    source = torchvision.models.resnet18()  # stands in for the downloaded file: same keys, 1000-class fc
    path = models.imagenet_weights_path("resnet18")
    path.parent.mkdir(parents=True)
    torch.save(source.state_dict(), path)
    model, info = models.build_model("resnet18", "imagenet")
    assert info == models.WeightsInfo("imagenet", file_sha256(path))
    assert torch.equal(model.backbone.conv1.weight, source.conv1.weight)
    assert torch.equal(model.backbone.layer4[1].bn2.running_var, source.layer4[1].bn2.running_var)


def _hashed(state: dict[str, torch.Tensor], stem: str = "tiny") -> tuple[str, bytes]:
    """A state dict saved to bytes, named <stem>-<sha256 prefix>.pth as torch.hub expects."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    return f"{stem}-{hashlib.sha256(data).hexdigest()[:8]}.pth", data


def test_fetch_downloads_once_into_torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    name, data = _hashed({"w": torch.arange(6.0)})
    with serve_files({name: data}) as (base, hits):
        fetched = models.fetch_imagenet_weights("resnet18", f"{base}/{name}", progress=False)
        again = models.fetch_imagenet_weights("resnet18", f"{base}/{name}", progress=False)
    assert fetched.path == tmp_path / "torch" / "hub" / "checkpoints" / name
    assert fetched.downloaded and fetched.path.read_bytes() == data
    assert fetched.sha256 == hashlib.sha256(data).hexdigest()
    assert not again.downloaded and again.sha256 == fetched.sha256 and hits[name] == 1
    assert [p.name for p in fetched.path.parent.iterdir()] == [name]  # no temporary file left behind


def test_fetch_rejects_a_hash_mismatch_and_keeps_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    _, data = _hashed({"w": torch.ones(3)})
    liar = "tiny-00000000.pth"  # the name claims another sha256 prefix
    with serve_files({liar: data}) as (base, _), pytest.raises(models.WeightsError, match="hash"):
        models.fetch_imagenet_weights("resnet18", f"{base}/{liar}", progress=False)
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    assert not list(checkpoints.iterdir())
    checkpoints.joinpath(liar).write_bytes(data)  # the same bytes put there by hand are caught too
    with pytest.raises(models.WeightsError, match="damaged"):
        models.fetch_imagenet_weights("resnet18", f"http://127.0.0.1:9/{liar}", progress=False)


def test_fetch_offline_names_file_url_and_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    url = closed_port_url("resnet50-11ad3fa6.pth")
    with pytest.raises(models.WeightsNotFoundError) as caught:
        models.ensure_initial_weights("resnet50", "imagenet", url, progress=False)
    message = str(caught.value)
    expected = tmp_path / "torch" / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth"
    assert str(expected) in message and url in message and "`aidetect weights fetch resnet50`" in message
    assert not expected.exists()


def test_ensure_initial_weights_then_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    source = torchvision.models.efficientnet_b0()  # the smallest backbone: a real file the model must fit
    name, data = _hashed(source.state_dict(), "efficientnet_b0")
    assert models.ensure_initial_weights("efficientnet_b0", "none") is None
    with pytest.raises(models.WeightsNotFoundError, match="not found"):
        models.ensure_initial_weights("efficientnet_b0", str(tmp_path / "missing.pt"))
    with serve_files({name: data}) as (base, _):
        path = models.ensure_initial_weights("efficientnet_b0", "imagenet", f"{base}/{name}", progress=False)
    model, info = models.build_model("efficientnet_b0", "imagenet", f"{base}/{name}")  # no download: the cache
    assert path == models.imagenet_weights_path("efficientnet_b0", f"{base}/{name}")
    assert info == models.WeightsInfo("imagenet", hashlib.sha256(data).hexdigest())
    assert torch.equal(model.backbone.features[0][0].weight, source.features[0][0].weight)


def test_weights_from_state_dict_file(tmp_path: Path) -> None:
    source = torchvision.models.resnet18(num_classes=7)  # a different head is ignored
    path = tmp_path / "backbone.pt"
    torch.save(source.state_dict(), path)
    model, info = models.build_model("resnet18", str(path))
    assert info.name == str(path)
    assert info.sha256 == file_sha256(path) and len(info.sha256) == 64
    assert torch.equal(model.backbone.layer1[0].conv1.weight, source.layer1[0].conv1.weight)


def test_weights_from_classifier_state_dict(tmp_path: Path) -> None:
    source, _ = models.build_model("resnet18", "none")
    path = tmp_path / "classifier.pt"
    torch.save(source.state_dict(), path)
    model, _ = models.build_model("resnet18", str(path))
    images = _images()
    assert torch.equal(model.eval()(images), source.eval()(images))


def test_weights_with_wrong_keys_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.save(torchvision.models.resnet50().state_dict(), path)
    with pytest.raises(models.WeightsError, match="does not fit") as caught:
        models.build_model("resnet18", str(path))
    assert str(path) in str(caught.value)


def test_weights_file_missing_or_garbage(tmp_path: Path) -> None:
    with pytest.raises(models.WeightsNotFoundError, match="nope.pt"):
        models.build_model("resnet18", str(tmp_path / "nope.pt"))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(models.WeightsError, match="garbage.pt"):
        models.build_model("resnet18", str(garbage))


def test_target_layer_is_last_block() -> None:
    model, _ = models.build_model("resnet18", "none")
    layer = models.target_layer(model)
    assert isinstance(layer, torch.nn.Module)
    assert layer is model.backbone.layer4[-1]
    with pytest.raises(TypeError):
        models.target_layer(torch.nn.Linear(2, 2))


def test_save_load_round_trip(tmp_path: Path) -> None:
    model, _ = models.build_model("resnet18", "none")
    path = tmp_path / "models" / "best.pt"
    models.save_checkpoint(path, model, {"image_size": 32, "epoch": 3})
    assert [p.name for p in path.parent.iterdir()] == ["best.pt"]  # no temporary file left behind
    loaded, meta = models.load_model(path)
    assert meta["model_name"] == "resnet18" and meta["image_size"] == 32 and meta["epoch"] == 3
    assert tuple(meta["classes"]) == ("real", "ai")
    assert not loaded.training
    images = _images(4)
    assert torch.equal(loaded(images), model.eval()(images))


def test_load_model_missing_and_corrupt(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        models.load_model(tmp_path / "absent.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(models.CheckpointError, match="bad.pt"):
        models.load_model(bad)
    plain = tmp_path / "plain.pt"
    torch.save({"a": torch.zeros(1)}, plain)
    with pytest.raises(models.CheckpointError, match="plain.pt"):
        models.load_model(plain)


def test_load_model_with_wrong_state(tmp_path: Path) -> None:
    model, _ = models.build_model("resnet18", "none")
    path = tmp_path / "wrong.pt"
    models.save_checkpoint(path, model, {"image_size": 32})
    payload = torch.load(path, weights_only=True)
    payload["meta"]["model_name"] = "efficientnet_b0"
    torch.save(payload, path)
    with pytest.raises(models.CheckpointError, match="wrong.pt"):
        models.load_model(path)
