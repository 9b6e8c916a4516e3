"""`aidetect predict`: a checkpoint path, JSON output, per-file errors, CAM overlays, missing models, --device."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from flows.cli import app
from pipeline_lib import models
from pipeline_lib.workspace import Workspace
from tests.conftest import make_image

runner = CliRunner()


def checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model, _ = models.build_model("resnet18", "none")
    path = tmp_path / "model.pt"
    models.save_checkpoint(path, model, {"image_size": 32})
    return path


def test_predict_json_with_a_checkpoint_path(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    good = [make_image(folder / "a.jpg", seed=1), make_image(folder / "nested" / "b.png", seed=2, fmt="PNG")]
    (folder / "broken.jpg").write_bytes(b"<html>not an image</html>")
    cams = tmp_path / "cams"
    args = ["predict", str(folder), "--model", str(checkpoint(tmp_path)), "--json", "--batch-size", "1"]
    result = runner.invoke(app, [*args, "--cam", str(cams)])
    assert result.exit_code == 1, f"a broken file should give exit 1: {result.output}"
    rows = {Path(row["path"]).name: row for row in json.loads(result.stdout)}
    assert set(rows) == {"a.jpg", "b.png", "broken.jpg"}, f"unexpected rows {sorted(rows)}"
    for path in good:
        row = rows[path.name]
        assert row["error"] is None and 0.0 <= row["p_ai"] <= 1.0 and row["label"] in ("ai", "real"), row
        assert Path(row["cam"]).is_file() and Path(row["cam"]).parent == cams, row
    assert rows["broken.jpg"]["p_ai"] is None and "unreadable image" in rows["broken.jpg"]["error"]

    table = runner.invoke(app, ["predict", str(good[0]), "--model", str(tmp_path / "model.pt")])
    assert table.exit_code == 0, table.output
    assert "a.jpg" in table.output and "p_ai" in table.output, table.output


def test_predict_missing_model_exits_2_with_a_clear_message(tmp_path: Path) -> None:
    image = make_image(tmp_path / "a.jpg")
    result = runner.invoke(app, ["predict", str(image), "--model", str(tmp_path / "nope.pt")])
    assert result.exit_code == 2 and "model not found" in result.output and "nope.pt" in result.output
    not_a_model = tmp_path / "junk.pt"
    not_a_model.write_bytes(b"junk")
    result = runner.invoke(app, ["predict", str(image), "--model", str(not_a_model)])
    assert result.exit_code == 2 and "junk.pt" in result.output, result.output
    workspace = Workspace.create(tmp_path / "ws").root
    result = runner.invoke(app, ["predict", str(image), "--workspace", str(workspace)])
    assert result.exit_code == 2 and "no 'champion'" in result.output, result.output
    result = runner.invoke(app, ["predict", str(image), "--model", "0" * 32, "--workspace", str(workspace)])
    assert result.exit_code == 2 and "no MLflow run" in result.output, result.output
    result = runner.invoke(app, ["predict", str(image), "--workspace", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "nowhere" in result.output, result.output
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["predict", str(tmp_path / "empty"), "--model", str(not_a_model)])
    assert result.exit_code == 2 and "no image files" in result.output, result.output


def test_predict_device_option(tmp_path: Path) -> None:
    image = make_image(tmp_path / "a.jpg")
    model = str(checkpoint(tmp_path))
    on_cpu = runner.invoke(app, ["predict", str(image), "--model", model, "--json", "--device", "cpu"])
    auto = runner.invoke(app, ["predict", str(image), "--model", model, "--json"])
    assert on_cpu.exit_code == 0 and auto.exit_code == 0, on_cpu.output + auto.output
    assert json.loads(on_cpu.stdout)[0]["p_ai"] == pytest.approx(json.loads(auto.stdout)[0]["p_ai"], abs=2e-3)
    wrong = runner.invoke(app, ["predict", str(image), "--model", model, "--device", "gpu"])
    assert wrong.exit_code == 2 and "--device" in wrong.output and "cuda:N" in wrong.output
    if not torch.cuda.is_available():
        missing = runner.invoke(app, ["predict", str(image), "--model", model, "--device", "cuda:0"])
        assert missing.exit_code == 2 and "no CUDA device" in missing.output
