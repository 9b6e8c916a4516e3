"""`aidetect predict`: a checkpoint path, JSON output, per-file errors, CAM overlays, missing models, --device."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from flows.cli import app
from pipeline_lib.assess.registry import register_model
from pipeline_lib.core.tracking.logged_models import log_pytorch_model
from pipeline_lib.core.tracking.runs import start_run
from pipeline_lib.core.tracking.store import tracking_uri
from pipeline_lib.core.workspace import Workspace
from pipeline_lib.learn import models
from tests.conftest import MarkerPayload, make_image

runner = CliRunner()


def test_predict_json_with_a_checkpoint_path(tmp_path: Path, toy_checkpoint: Path) -> None:
    folder = tmp_path / "imgs"
    good = [make_image(folder / "a.jpg", seed=1), make_image(folder / "nested" / "b.png", seed=2, fmt="PNG")]
    (folder / "broken.jpg").write_bytes(b"<html>not an image</html>")
    cams = tmp_path / "cams"
    args = ["predict", str(folder), "--model", str(toy_checkpoint), "--json", "--batch-size", "1"]
    result = runner.invoke(app, [*args, "--cam", str(cams)])
    assert result.exit_code == 1, f"a broken file should give exit 1: {result.output}"
    rows = {Path(row["path"]).name: row for row in json.loads(result.stdout)}
    assert set(rows) == {"a.jpg", "b.png", "broken.jpg"}, f"unexpected rows {sorted(rows)}"
    for path in good:
        row = rows[path.name]
        assert row["error"] is None and 0.0 <= row["p_ai"] <= 1.0 and row["label"] in ("ai", "real"), row
        assert Path(row["cam"]).is_file() and Path(row["cam"]).parent == cams, row
    assert rows["broken.jpg"]["p_ai"] is None and "unreadable image" in rows["broken.jpg"]["error"]

    table = runner.invoke(app, ["predict", str(good[0]), "--model", str(toy_checkpoint)])
    assert table.exit_code == 0, table.output
    assert "a.jpg" in table.output and "p_ai" in table.output, table.output


def test_predict_lists_every_file_it_did_not_score_with_the_reason(tmp_path: Path, toy_checkpoint: Path) -> None:
    folder = tmp_path / "imgs"
    make_image(folder / "a.jpg", seed=1)
    make_image(folder / "nested" / "b.png", seed=2, fmt="PNG")
    (folder / "notes.txt").write_text("what these are", encoding="utf-8")
    (folder / "nested" / "logo.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"/>', encoding="utf-8")
    (folder / "outside.jpg").symlink_to(make_image(tmp_path / "elsewhere.jpg", seed=3))
    model = str(toy_checkpoint)
    result = runner.invoke(app, ["predict", str(folder), "--model", model])
    assert result.exit_code == 0, f"a file left out is no error: {result.output}"
    listed = [line for line in result.stdout.splitlines() if line.startswith("left out")]
    assert len(listed) == 3, f"every file not scored must be listed once: {result.stdout}"
    reasons = (("notes.txt", "not an image (text)"), ("logo.svg", "not an image"), ("outside.jpg", "symlink outside"))
    for name, reason in reasons:
        assert any(f"{name}: {reason}" in line for line in listed), f"{name} not listed with '{reason}': {listed}"
    assert "5 file(s): 2 scored, 0 error, 3 left out" in result.stdout, result.stdout

    rows = {Path(row["path"]).name: row for row in _predict_json(str(folder), "--model", model)}
    assert set(rows) == {"a.jpg", "b.png", "notes.txt", "logo.svg", "outside.jpg"}, sorted(rows)
    assert rows["notes.txt"]["left_out"] == "not an image (text)" and rows["notes.txt"]["p_ai"] is None
    assert rows["a.jpg"]["left_out"] is None and rows["a.jpg"]["p_ai"] is not None

    only_text = tmp_path / "texts"
    (only_text / "sub").mkdir(parents=True)
    (only_text / "sub" / "readme.txt").write_text("no images here", encoding="utf-8")
    result = runner.invoke(app, ["predict", str(only_text), "--model", model])
    assert result.exit_code == 2 and "no image files" in result.output, result.output
    assert "readme.txt: not an image (text)" in result.output, result.output


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


def _logged_run(workspace: Path, model: torch.nn.Module, calibration: str | None, saved: Path) -> str:
    """An MLflow run in the workspace's store that logged model with its checkpoint file `saved` (its state_dict),
    and registered it with calibration, if given."""
    ws = Workspace.open(workspace)
    tracker = start_run(tracking_uri(None, ws), "aidetect", ws, "run", {})
    example = torch.rand(1, 3, 32, 32).numpy()
    uri = log_pytorch_model(tracker, model, example, ["torch"], checkpoint=saved)
    if calibration is not None:
        register_model(tracker, uri, "aidetect", 0.9, "t", "m", image_size=32, calibration=calibration)
    tracker.finish()
    return tracker.run_id


def _predict_json(*args: str) -> list[dict]:
    result = runner.invoke(app, ["predict", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_predict_with_a_run_id_uses_the_runs_calibration_and_normalisation(
    tmp_path: Path, toy_checkpoint: Path
) -> None:
    from pipeline_lib.assess.predict import ModelCalibration, write_calibration
    from pipeline_lib.core.config import NormalizeConfig

    images = [make_image(tmp_path / "in" / f"{i}.jpg", seed=i, size=(60, 50)) for i in range(3)]
    path = toy_checkpoint
    model, _ = models.load_model(path)
    calibration = ModelCalibration(4.0, NormalizeConfig(mode="jpeg", quality=20))
    write_calibration(path, calibration)
    workspace = str(Workspace.create(tmp_path / "ws").root)
    run_id = _logged_run(Path(workspace), model, json.dumps(calibration.as_dict()), path)
    by_run = _predict_json(str(tmp_path / "in"), "--model", run_id, "--workspace", workspace)
    by_champion = _predict_json(str(tmp_path / "in"), "--model", "champion", "--workspace", workspace)
    by_file = _predict_json(str(tmp_path / "in"), "--model", str(path))
    assert len(by_run) == len(images)
    for run_row, champion_row, file_row in zip(by_run, by_champion, by_file, strict=True):
        assert run_row["p_ai"] == pytest.approx(champion_row["p_ai"], abs=1e-6), (run_row, champion_row)
        assert run_row["p_ai"] == pytest.approx(file_row["p_ai"], abs=1e-6), "not the checkpoint's calibration"
        assert run_row["p_ai_raw"] == pytest.approx(file_row["p_ai_raw"], abs=1e-6), "not decoded with the policy"
        assert run_row["p_ai"] != pytest.approx(run_row["p_ai_raw"], abs=1e-9), "temperature 4 was not applied"


def test_predict_with_a_run_without_calibration_says_so(tmp_path: Path, toy_checkpoint: Path) -> None:
    image = make_image(tmp_path / "a.jpg", seed=1)
    saved = toy_checkpoint
    model, _ = models.load_model(saved)
    workspace = str(Workspace.create(tmp_path / "ws").root)
    run_id = _logged_run(Path(workspace), model, None, saved)
    result = runner.invoke(app, ["predict", str(image), "--model", run_id, "--workspace", workspace, "--json"])
    assert result.exit_code == 0 and "records no calibration" in result.stderr, result.output
    row = json.loads(result.stdout)[0]
    assert row["p_ai"] == row["p_ai_raw"]


def test_predict_device_option(tmp_path: Path, toy_checkpoint: Path) -> None:
    image = make_image(tmp_path / "a.jpg")
    model = str(toy_checkpoint)
    on_cpu = runner.invoke(app, ["predict", str(image), "--model", model, "--json", "--device", "cpu"])
    auto = runner.invoke(app, ["predict", str(image), "--model", model, "--json"])
    assert on_cpu.exit_code == 0 and auto.exit_code == 0, on_cpu.output + auto.output
    assert json.loads(on_cpu.stdout)[0]["p_ai"] == pytest.approx(json.loads(auto.stdout)[0]["p_ai"], abs=2e-3)
    wrong = runner.invoke(app, ["predict", str(image), "--model", model, "--device", "gpu"])
    assert wrong.exit_code == 2 and "--device" in wrong.output and "cuda:N" in wrong.output
    if not torch.cuda.is_available():
        missing = runner.invoke(app, ["predict", str(image), "--model", model, "--device", "cuda:0"])
        assert missing.exit_code == 2 and "no CUDA device" in missing.output


def test_predict_champion_is_rebuilt_from_its_state_dict_and_never_unpickled(
    tmp_path: Path, toy_checkpoint: Path
) -> None:
    workspace = Workspace.create(tmp_path / "ws")
    uri = tracking_uri(None, workspace)
    tracker = start_run(uri, "aidetect", workspace, "run")
    path = toy_checkpoint
    model, _ = models.load_model(path)
    example = np.random.rand(1, 3, 32, 32).astype("float32")
    logged = log_pytorch_model(tracker, model, example, ["torch"], checkpoint=path)
    register_model(tracker, logged, "aidetect", 0.9, "t", "m", image_size=32, architecture="resnet18")
    marker = tmp_path / "pwned"
    (pickled,) = (workspace.root / "mlartifacts").rglob("model.pth")
    torch.save(MarkerPayload(str(marker)), pickled)  # the tracking store was tampered with
    image = make_image(tmp_path / "a.jpg")
    result = runner.invoke(app, ["predict", str(image), "--workspace", str(workspace.root), "--json"])
    assert result.exit_code == 0, result.output
    assert not marker.exists(), "predict --model champion unpickled the tracking store's model"
    (row,) = json.loads(result.stdout)
    assert row["error"] is None and 0 <= row["p_ai"] <= 1

    (state,) = (workspace.root / "mlartifacts").rglob("best.pt")
    torch.save(MarkerPayload(str(marker)), state)
    result = runner.invoke(app, ["predict", str(image), "--workspace", str(workspace.root), "--trust-pickle"])
    assert result.exit_code == 2 and "cannot be loaded safely" in result.output, result.output
    assert not marker.exists()


def test_predict_applies_the_ingest_policy_per_file(tmp_path: Path, toy_checkpoint: Path) -> None:
    big = make_image(tmp_path / "big.jpg", seed=1, size=(64, 64))
    small = make_image(tmp_path / "small.jpg", seed=2, size=(40, 40))
    config = tmp_path / "strict.yaml"
    config.write_text("ingest:\n  max_pixels: 2000\n", encoding="utf-8")
    args = ["predict", str(big), str(small), "--model", str(toy_checkpoint), "--json"]
    result = runner.invoke(app, [*args, "--config", str(config)])
    assert result.exit_code == 1, result.output
    rows = {Path(row["path"]).name: row for row in json.loads(result.stdout)}
    assert "refused by the ingest policy: decompression_bomb" in rows["big.jpg"]["error"]
    assert rows["small.jpg"]["error"] is None


def test_predict_refuses_a_calibration_file_with_an_extreme_temperature(tmp_path: Path, toy_checkpoint: Path) -> None:
    from pipeline_lib.assess.predict import calibration_path

    image = make_image(tmp_path / "a.jpg", seed=1)
    model = toy_checkpoint
    for extreme in ("1e-12", "1e12"):
        calibration_path(model).write_text(f'{{"temperature": {extreme}}}', encoding="utf-8")
        result = runner.invoke(app, ["predict", str(image), "--model", str(model), "--json"])
        assert result.exit_code == 2, result.output
        assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output, result.output
        assert str(calibration_path(model)) in result.output and f"T={float(extreme):.3g}" in result.output
        assert "outside 0.2..10" in result.output, result.output


def test_predict_trust_pickle_on_a_model_file_that_holds_no_model_is_one_line(
    tmp_path: Path, toy_checkpoint: Path
) -> None:
    workspace = Workspace.create(tmp_path / "ws")
    tracker = start_run(tracking_uri(None, workspace), "aidetect", workspace, "run")
    path = toy_checkpoint
    model, _ = models.load_model(path)
    example = np.random.rand(1, 3, 32, 32).astype("float32")
    logged = log_pytorch_model(tracker, model, example, ["torch"], checkpoint=path)
    register_model(tracker, logged, "aidetect", 0.9, "t", "m", image_size=32, architecture="resnet18")
    (state,) = (workspace.root / "mlartifacts").rglob("best.pt")
    state.unlink()  # no state_dict to rebuild it from
    (pickled,) = (workspace.root / "mlartifacts").rglob("model.pth")
    torch.save(5, pickled)  # a number where the model was
    image = make_image(tmp_path / "a.jpg")
    result = runner.invoke(app, ["predict", str(image), "--workspace", str(workspace.root), "--trust-pickle"])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    line = result.stderr.strip().splitlines()[-1]  # after MLflow's download progress bars: one line
    assert "holds no torch model (AttributeError: 'int' object has no attribute 'eval')" in line, line
    assert line.startswith("model not found: champion of 'aidetect'") and "a checkpoint file (.pt)" in line, line
