"""The `aidetect` command: clear errors with exit code 2, import of a folder, status."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image
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
