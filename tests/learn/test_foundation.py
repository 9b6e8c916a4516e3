"""Tests for pipeline_lib.learn.foundation: the CLIP and DINOv2 backbones (tiny models of the same classes), their
weights (hash-checked downloads from loopback servers, the files' formats) and the missing-extra error."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch
from open_clip.transformer import VisionTransformer as ClipTower
from timm.models.vision_transformer import VisionTransformer as TimmViT

from pipeline_lib.core.code_index import PROJECT_ROOT
from pipeline_lib.core.config import FOUNDATION_MODELS, TORCHVISION_MODELS, TrainConfig
from pipeline_lib.learn import foundation, models
from pipeline_lib.learn.weights import WeightsError, WeightsNotFoundError
from tests.loopback import closed_port_url, serve_files, serve_hub
from tests.tiny_backbones import CLIP_SIZE, DINO_SIZE, safetensors_file, torchscript_file, use_tiny_backbones


@pytest.fixture(autouse=True)
def _tiny(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    use_tiny_backbones(monkeypatch)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))


def _checkpoints(tmp_path: Path) -> Path:
    return tmp_path / "torch" / "hub" / "checkpoints"


def test_names_agree_between_config_models_and_specs() -> None:
    literal = typing.get_args(TrainConfig.model_fields["model"].annotation)
    assert set(literal) == set(models.MODEL_NAMES) == set(TORCHVISION_MODELS) | set(FOUNDATION_MODELS)
    assert set(foundation.SPECS) == set(FOUNDATION_MODELS), "every foundation name needs a spec"
    assert TrainConfig(model="clip_vit_l14").resolved_mode == "probe"
    assert TrainConfig(model="resnet50").resolved_mode == "finetune", "torchvision backbones keep the recipe"
    assert TrainConfig(model="dinov2_vits14", mode="finetune").max_epochs == 30
    assert TrainConfig(model="resnet18", mode="probe").max_epochs == 100


def test_pinned_hashes_are_the_ones_the_publishers_urls_carry() -> None:
    sources = {name: spec.weights for name, spec in foundation.SPECS.items()}
    for name in ("clip_vit_b16", "clip_vit_l14"):
        source = sources[name]
        assert len(source.sha256) == 64 and source.url.split("/")[-2] == source.sha256, name
        assert source.format == "torchscript"
    for name in ("clip_vit_b16_laion", "clip_vit_l14_laion"):
        source = sources[name]
        assert source.sha256 and source.file_name.endswith(f"-{source.sha256}.pt"), name
    for name in ("dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14"):
        source = sources[name]
        assert source.sha256 == "" and "no published sha256" in source.hash_source, name
        assert source.format == "safetensors" and source.url.startswith("https://huggingface.co/timm/")
    assert len({source.file_name for source in sources.values()}) == len(sources), "one file each"


@pytest.mark.parametrize(("name", "size", "tower"), [("clip_vit_b16", CLIP_SIZE, ClipTower),
                                                     ("dinov2_vitb14", DINO_SIZE, TimmViT)])  # fmt: skip
def test_tiny_backbones_of_the_real_classes_classify(name: str, size: int, tower: type) -> None:
    model = models.Classifier(name)
    assert isinstance(model.backbone, tower), "the tiny model must be the library's own class"
    logits = model(torch.rand(2, 3, size, size))
    assert logits.shape == (2, 2) and model.feature_count == model.head.in_features
    spec = foundation.spec_of(name)
    assert torch.equal(model.mean.flatten(), torch.tensor(spec.mean)), "inputs are normalised as the backbone was"


def test_input_sizes_each_backbone_takes() -> None:
    foundation.check_input_size("dinov2_vitb14", 42)
    with pytest.raises(ValueError, match="multiple of 14"):
        foundation.check_input_size("dinov2_vitb14", 40)
    with pytest.raises(ValueError, match=f"must be {CLIP_SIZE} for clip_vit_l14"):
        foundation.check_input_size("clip_vit_l14", CLIP_SIZE * 2)
    foundation.check_input_size("resnet50", 37)  # torchvision backbones take any size
    model = models.Classifier("dinov2_vits14")
    assert model(torch.rand(1, 3, 42, 42)).shape == (1, 2), "DINOv2 interpolates its position embedding"


def test_tokens_to_grid_drops_the_prefix_tokens() -> None:
    tokens = torch.arange(2 * 17 * 3, dtype=torch.float32).reshape(2, 17, 3)
    grid = foundation.tokens_to_grid(tokens, prefix=1)
    assert grid.shape == (2, 3, 4, 4)
    assert torch.equal(grid[0, :, 0, 0], tokens[0, 1]), "the first patch token is the grid's top-left cell"
    with pytest.raises(ValueError, match="square grid"):
        foundation.tokens_to_grid(tokens, prefix=2)


def test_openai_torchscript_weights_are_fetched_checked_and_loaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = models.Classifier("clip_vit_b16").backbone
    data, digest = torchscript_file(source)
    use_tiny_backbones(monkeypatch, clip_vit_b16=digest)  # OpenAI's URL pins the full sha256 of its file
    with serve_files({"ViT-B-16.pt": data, "other.pt": data + b"x"}) as (base, hits):
        fetched = models.fetch_weights("clip_vit_b16", f"{base}/ViT-B-16.pt", progress=False)
        again = models.fetch_weights("clip_vit_b16", f"{base}/ViT-B-16.pt", progress=False)
    assert fetched.path == _checkpoints(tmp_path) / "ViT-B-16.pt" and fetched.downloaded and fetched.sha256 == digest
    assert not again.downloaded and hits["ViT-B-16.pt"] == 1, "a file in the cache is not downloaded again"
    model, info = models.build_model("clip_vit_b16", "pretrained")
    assert info == models.WeightsInfo("pretrained", digest)
    for key, value in source.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[key], value), f"{key} must come from the file"


def test_a_download_that_does_not_match_the_pinned_hash_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, _ = torchscript_file(models.Classifier("clip_vit_b16").backbone)
    use_tiny_backbones(monkeypatch, clip_vit_b16="ab" * 32)
    with serve_files({"ViT-B-16.pt": data}) as (base, _), pytest.raises(WeightsError, match="hash"):
        models.fetch_weights("clip_vit_b16", f"{base}/ViT-B-16.pt", progress=False)
    assert not _checkpoints(tmp_path).exists() or not list(_checkpoints(tmp_path).iterdir()), "nothing stored"
    _checkpoints(tmp_path).mkdir(parents=True, exist_ok=True)
    (_checkpoints(tmp_path) / "ViT-B-16.pt").write_bytes(data)  # the same bytes copied there by hand
    with pytest.raises(WeightsError, match="not the published one"):
        models.build_model("clip_vit_b16", "pretrained")


def test_a_torchscript_file_is_loaded_only_when_it_is_the_published_one(tmp_path: Path) -> None:
    data, _ = torchscript_file(models.Classifier("clip_vit_b16").backbone)
    path = tmp_path / "mine.pt"
    path.write_bytes(data)
    with pytest.raises(WeightsError, match="TorchScript"):
        models.build_model("clip_vit_b16", str(path))


def test_offline_fetch_names_the_file_the_url_and_the_command(tmp_path: Path) -> None:
    url = closed_port_url("ViT-L-14.pt")
    with pytest.raises(WeightsNotFoundError) as caught:
        models.ensure_initial_weights("clip_vit_l14", "pretrained", url, progress=False, image_size=CLIP_SIZE)
    message = str(caught.value)
    assert str(_checkpoints(tmp_path) / "ViT-L-14.pt") in message and url in message
    assert "`aidetect weights fetch clip_vit_l14`" in message
    with pytest.raises(WeightsNotFoundError, match="aidetect weights fetch dinov2_vits14"):
        models.build_model("dinov2_vits14", "pretrained")  # building never downloads


def test_hub_files_are_checked_against_the_sha256_the_hub_announces(tmp_path: Path) -> None:
    source = models.Classifier("dinov2_vits14").backbone
    data, digest = safetensors_file(source.state_dict())
    name = "model.safetensors"
    with serve_hub({name: data}) as (base, hits):
        fetched = models.fetch_weights("dinov2_vits14", f"{base}/resolve/{name}", progress=False)
    assert fetched.sha256 == digest and fetched.path.name == "vit_small_patch14_dinov2.lvd142m.safetensors"
    assert hits[f"HEAD /resolve/{name}"] == 1 and hits[f"GET /cdn/{name}"] == 1
    model, info = models.build_model("dinov2_vits14", "pretrained")
    assert info.sha256 == digest
    assert torch.equal(model.backbone.pos_embed, source.pos_embed)
    with serve_hub({name: data}, announced={name: "cd" * 32}) as (base, _), pytest.raises(WeightsError, match="hash"):
        models.fetch_weights("dinov2_vitb14", f"{base}/resolve/{name}", progress=False)
    with serve_hub({name: data}, announced={name: ""}) as (base, _):
        with pytest.raises(WeightsError, match="cannot be hash-checked"):
            models.fetch_weights("dinov2_vitb14", f"{base}/resolve/{name}", progress=False)
    assert sorted(p.name for p in _checkpoints(tmp_path).iterdir()) == [fetched.path.name], "no partial file kept"


def test_a_mirror_file_name_carrying_a_hash_prefix_is_checked_by_it(tmp_path: Path) -> None:
    data, digest = safetensors_file(models.Classifier("dinov2_vitl14").backbone.state_dict())
    good, liar = f"dino-{digest[:8]}.safetensors", "dino-00000000.safetensors"
    with serve_files({good: data, liar: data}) as (base, _):
        assert models.fetch_weights("dinov2_vitl14", f"{base}/{good}", progress=False).sha256 == digest
        _checkpoints(tmp_path).joinpath("vit_large_patch14_dinov2.lvd142m.safetensors").unlink()
        with pytest.raises(WeightsError, match="hash"):
            models.fetch_weights("dinov2_vitl14", f"{base}/{liar}", progress=False)


def test_laion_style_torch_checkpoints_load_weights_only(tmp_path: Path) -> None:
    source = models.Classifier("clip_vit_l14_laion").backbone
    state = {f"module.visual.{key}": value for key, value in source.state_dict().items()}
    state["module.logit_scale"] = torch.ones([])  # the text side of a whole CLIP checkpoint is ignored
    path = tmp_path / "laion.pt"
    torch.save({"epoch": 32, "name": "run", "state_dict": state}, path)
    model, info = models.build_model("clip_vit_l14_laion", str(path))
    assert info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert torch.equal(model.backbone.proj, source.proj)
    torch.save({"state_dict": {"visual.proj": torch.zeros(3, 3)}}, path)
    with pytest.raises(WeightsError, match="does not fit the model"):
        models.build_model("clip_vit_l14_laion", str(path))


def test_choosing_a_foundation_backbone_without_the_extra_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "open_clip", None)  # what an install without the extra gives on import
    with pytest.raises(foundation.BackboneUnavailableError, match=r"pip install 'aidetect\[foundation\]'"):
        models.ensure_initial_weights("clip_vit_b16", "none")
    with pytest.raises(WeightsError, match="open-clip-torch"):
        models.Classifier("clip_vit_l14")
    assert models.Classifier("resnet18").feature_count == 512, "torchvision backbones need no extra"


def test_aidetect_imports_without_the_extra() -> None:
    blocker = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('open_clip', 'timm', 'safetensors'):\n"
        "            raise ImportError(f'no {name} (the foundation extra is not installed)')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import pipeline_lib.learn.models, pipeline_lib.learn.probe, pipeline_lib.assess.registry, tasks.stages\n"
        "from pipeline_lib.learn import models\n"
        "models.build_model('resnet18', 'none')\n"
        "try:\n"
        "    models.ensure_initial_weights('dinov2_vits14', 'pretrained')\n"
        "except models.WeightsError as error:\n"
        "    print(error)\n"
    )
    done = subprocess.run([sys.executable, "-c", blocker], cwd=PROJECT_ROOT, capture_output=True, text=True,
                          check=False, env={"PYTHONPATH": str(PROJECT_ROOT), "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "pip install 'aidetect[foundation]'" in done.stdout and "timm" in done.stdout

