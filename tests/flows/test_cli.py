"""The `aidetect` command: clear errors with exit code 2, import of a folder, status, fetching weights."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from flows.cli import app
from tests.conftest import make_image
from tests.loopback import closed_port_url, serve_files

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


def test_review_timeout_exits_3_with_how_to_continue(harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    folder = tmp_path / "ai"
    for index in range(2):
        make_image(folder / "prompt-a" / f"v{index}.png", seed=index, size=(64, 64), fmt="PNG")
    name, data = _hashed_weights()
    config = tmp_path / "config.yaml"
    with serve_files({name: data}) as (base, _):
        config.write_text(
            f"sources:\n  folders:\n    - path: {folder}\n      label: ai\n"
            "review:\n  mode: require\n  timeout_hours: 0.0003\n  port: 0\n"
            f"train:\n  model: resnet18\n  weights: imagenet\n  weights_url: {base}/{name}\n",
            encoding="utf-8",
        )
        result = runner.invoke(app, ["run", "--config", str(config), "--workspace", str(tmp_path / "ws")])
    assert result.exit_code == 3, result.output
    assert "aidetect review serve" in result.output and "aidetect run" in result.output
    # The weights training will need were fetched at the start, not after the review.
    assert (tmp_path / "torch" / "hub" / "checkpoints" / name).read_bytes() == data


def _hashed_weights(stem: str = "tiny") -> tuple[str, bytes]:
    """A small state dict named <stem>-<sha256 prefix>.pth, as torch.hub checks it."""
    buffer = io.BytesIO()
    torch.save({"w": torch.arange(4.0)}, buffer)
    data = buffer.getvalue()
    return f"{stem}-{hashlib.sha256(data).hexdigest()[:8]}.pth", data


def test_weights_fetch_stores_the_file_where_torch_looks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    name, data = _hashed_weights()
    liar = "tiny-00000000.pth"
    stored = tmp_path / "torch" / "hub" / "checkpoints" / name
    with serve_files({name: data, liar: data}) as (base, hits):
        result = runner.invoke(app, ["weights", "fetch", "resnet18", "--url", f"{base}/{name}"])
        assert result.exit_code == 0, result.output
        assert str(stored) in result.output and hashlib.sha256(data).hexdigest() in result.output
        again = runner.invoke(app, ["weights", "fetch", "resnet18", "--url", f"{base}/{name}"])
        assert again.exit_code == 0 and "already in the cache" in again.output and hits[name] == 1
        wrong = runner.invoke(app, ["weights", "fetch", "resnet18", "--url", f"{base}/{liar}"])
    assert stored.read_bytes() == data
    assert wrong.exit_code == 2 and "hash" in wrong.output and not stored.with_name(liar).exists()
    url = closed_port_url("resnet50-11ad3fa6.pth")
    offline = runner.invoke(app, ["weights", "fetch", "--url", url])  # the model from the config: resnet50
    assert offline.exit_code == 2
    text = " ".join(offline.output.split())
    assert "resnet50-11ad3fa6.pth" in text and url in text and "aidetect weights fetch resnet50" in text
    unknown = runner.invoke(app, ["weights", "fetch", "vgg11"])
    assert unknown.exit_code == 2 and "train.model" in unknown.output
    unhashed = runner.invoke(app, ["weights", "fetch", "resnet18", "--url", "https://mirror.example/resnet18.pth"])
    assert unhashed.exit_code == 2 and "sha256 prefix" in " ".join(unhashed.output.split())


def test_run_offline_without_weights_exits_2_before_any_stage(
    harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    make_image(tmp_path / "ai" / "prompt-a" / "v0.png", seed=1, size=(64, 64), fmt="PNG")
    url = closed_port_url("resnet18-f37072fd.pth")
    config = tmp_path / "config.yaml"
    config.write_text(
        f"sources:\n  folders:\n    - path: {tmp_path / 'ai'}\n      label: ai\n"
        f"train:\n  model: resnet18\n  weights: imagenet\n  weights_url: {url}\n",
        encoding="utf-8",
    )
    result = runner.invoke(app, ["run", "--config", str(config), "--workspace", str(tmp_path / "ws")])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    expected = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert str(expected) in text and url in text and "`aidetect weights fetch resnet18`" in text
    assert not (tmp_path / "ws").exists()  # no stage ran: nothing crawled, no workspace, no MLflow run


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


def test_review_pack_is_built_on_request_with_the_decisions_so_far(tmp_path: Path):
    from pipeline_lib.catalog import new_rows, write_snapshot
    from pipeline_lib.review import Decision, append_decisions, thumbnail_path
    from pipeline_lib.workspace import Workspace

    result = runner.invoke(app, ["review", "pack", "--workspace", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "nowhere" in result.output
    workspace = Workspace.create(tmp_path / "ws")
    result = runner.invoke(app, ["review", "pack", "--workspace", str(workspace.root)])
    assert result.exit_code == 2 and "nothing to review yet" in result.output
    rows = []
    for seed in range(3):
        sha = f"{seed}".ljust(64, "a")
        path = make_image(workspace.store / sha[:2] / f"{sha}.jpg", seed=seed, size=(640, 480))
        rows.append({"sha256": sha, "path": workspace.relative(path), "label": "real", "group": "g", "status": "ok"})
    write_snapshot(workspace, "dedup", new_rows(rows))
    append_decisions(workspace, [Decision(rows[0]["sha256"], "reject", "unrelated", "me")])
    result = runner.invoke(app, ["review", "pack", "--workspace", str(workspace.root), "--thumbnail-size", "64"])
    assert result.exit_code == 0, result.output
    assert "2 image(s) undecided" in result.output
    page = (workspace.review / "pack" / "index.html").read_text(encoding="utf-8")
    assert "2 pending" in page and page.count("<figure") == 2, "the rejected image is not shown"
    for row in rows[1:]:
        with Image.open(thumbnail_path(workspace, row["sha256"])) as thumb:
            assert max(thumb.size) == 64
