"""The `aidetect` command: clear errors with exit code 2, import of a folder, status."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from flows.cli import app
from tests.conftest import make_image

runner = CliRunner()


def test_config_typo_and_wrong_type_name_the_key(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epoch: 3\n  lr: fast\n", encoding="utf-8")
    result = runner.invoke(app, ["run", "--config", str(bad), "--workspace", str(tmp_path / "ws")])
    assert result.exit_code == 2
    assert "train.epoch" in result.output and "unknown key" in result.output
    assert "train.lr" in result.output
    result = runner.invoke(app, ["run", "--set", "split.tset=0.2", "--workspace", str(tmp_path / "ws")])
    assert result.exit_code == 2 and "split.tset" in result.output


def test_missing_workspace_is_named(tmp_path: Path):
    result = runner.invoke(app, ["status", "--workspace", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "nowhere" in result.output


def test_import_rejects_a_bad_label_then_imports_and_status_counts(harness, tmp_path: Path):
    folder = tmp_path / "midjourney"
    for index in range(3):
        make_image(folder / "prompt-a" / f"v{index}.png", seed=index, size=(64, 64), fmt="PNG")
    make_image(folder / "prompt-b" / "v0.jpg", seed=9, size=(64, 64))
    (folder / "prompt-b" / "broken.jpg").write_bytes(b"<html>not an image</html>")
    ws = tmp_path / "ws"
    result = runner.invoke(app, ["import", str(folder), "--label", "fake", "--workspace", str(ws)])
    assert result.exit_code == 2 and "--label" in result.output
    result = runner.invoke(app, ["import", str(folder), "--label", "ai", "--generator", "mj", "--workspace", str(ws)])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout[result.stdout.index("{") : result.stdout.rindex("}") + 1])
    assert summary["counts"]["ingest.ok"] == 4 and summary["counts"]["ingest.invalid"] == 1
    assert {row["keyword"] for row in summary["per_source"]} == {"prompt-a", "prompt-b"}
    status = runner.invoke(app, ["status", "--workspace", str(ws), "--json"])
    info = json.loads(status.stdout)
    assert info["label"] == {"ai": 4}
    assert (ws / "crawl" / "imports.json").is_file()


def test_review_timeout_exits_3_with_how_to_continue(harness, tmp_path: Path):
    folder = tmp_path / "ai"
    for index in range(2):
        make_image(folder / "prompt-a" / f"v{index}.png", seed=index, size=(64, 64), fmt="PNG")
    config = tmp_path / "config.yaml"
    config.write_text(
        f"sources:\n  folders:\n    - path: {folder}\n      label: ai\n"
        "review:\n  mode: require\n  timeout_hours: 0.0003\n  port: 0\n",
        encoding="utf-8",
    )
    result = runner.invoke(app, ["run", "--config", str(config), "--workspace", str(tmp_path / "ws")])
    assert result.exit_code == 3, result.output
    assert "aidetect review serve" in result.output and "aidetect run" in result.output


def test_status_and_ui_use_the_configured_tracking_server_and_say_when_it_is_down(tmp_path: Path):
    from pipeline_lib.workspace import Workspace
    from tests.flows.mlflow_server import free_port

    ws = Workspace.create(tmp_path / "ws").root
    down = f"http://127.0.0.1:{free_port()}"
    result = runner.invoke(app, ["status", "--workspace", str(ws), "--set", f"tracking.uri={down}", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["tracking_uri"] == down and info["runs"] == []
    assert info["runs_error"] == f"no MLflow tracking server answers at {down} (tracking.uri)"
    result = runner.invoke(app, ["ui", "--workspace", str(ws), "--set", f"tracking.uri={down}"])
    assert result.exit_code == 0 and f"MLflow UI: {down}  (the tracking server of tracking.uri)" in result.output
