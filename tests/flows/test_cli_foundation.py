"""`aidetect weights fetch` for the foundation backbones: hash-checked from a loopback mirror, offline and
missing-extra errors as one line with exit 2."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from pipeline_lib.learn import models
from tests.loopback import closed_port_url, serve_files
from tests.tiny_backbones import torchscript_file, use_tiny_backbones

runner = CliRunner()


def test_weights_fetch_of_a_clip_backbone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    use_tiny_backbones(monkeypatch)
    data, digest = torchscript_file(models.Classifier("clip_vit_b16").backbone)
    use_tiny_backbones(monkeypatch, clip_vit_b16=digest)
    stored = tmp_path / "torch" / "hub" / "checkpoints" / "ViT-B-16.pt"
    with serve_files({"mirror/ViT-B-16.pt": data, "bad/ViT-B-16.pt": b"x" + data}) as (base, hits):
        bad = runner.invoke(app, ["weights", "fetch", "clip_vit_b16", "--url", f"{base}/bad/ViT-B-16.pt"])
        assert bad.exit_code == 2 and "hash" in bad.output and not stored.exists(), bad.output
        result = runner.invoke(app, ["weights", "fetch", "clip_vit_b16", "--url", f"{base}/mirror/ViT-B-16.pt"])
    assert result.exit_code == 0, result.output
    assert str(stored) in result.output and digest in result.output and hits["mirror/ViT-B-16.pt"] == 1
    url = closed_port_url("ViT-L-14.pt")
    offline = runner.invoke(app, ["weights", "fetch", "clip_vit_l14", "--url", url])
    text = " ".join(offline.output.split())
    assert offline.exit_code == 2 and url in text and "`aidetect weights fetch clip_vit_l14`" in text
    assert "Traceback" not in offline.output


def test_weights_fetch_without_the_extra_is_one_line_naming_the_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setitem(sys.modules, "timm", None)  # an install without the extra
    result = runner.invoke(app, ["weights", "fetch", "dinov2_vitb14"])
    assert result.exit_code == 2, result.output
    assert "pip install 'aidetect[foundation]'" in result.output and len(result.output.strip().splitlines()) == 1
