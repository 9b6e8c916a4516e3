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


# --------------------------------------------------------------------------------------------------------------
# Every known failure: one line naming what to look at, exit 2 (never a traceback)


def _one_line_exit_2(result, *expected: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output, result.output
    for text in expected:
        assert text in result.output, (text, result.output)


def test_a_non_utf8_config_is_named(tmp_path: Path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("train:\n  model: r\xe9snet\n".encode("latin-1"))
    result = runner.invoke(app, ["run", "--config", str(bad), "--workspace", str(tmp_path / "ws")])
    _one_line_exit_2(result, "ConfigError", "latin1.yaml", "not UTF-8")


def test_a_corrupt_decisions_line_is_named(tmp_path: Path):
    from pipeline_lib.workspace import Workspace

    ws = Workspace.create(tmp_path / "ws")
    (ws.review / "decisions.jsonl").write_text('{"oops"\n{"sha256": "a", "decision": "approve"}\n', encoding="utf-8")
    result = runner.invoke(app, ["review", "status", "--workspace", str(ws.root)])
    _one_line_exit_2(result, "ReviewError", "decisions.jsonl:1", "aidetect doctor")


def test_a_damaged_snapshot_is_named(tmp_path: Path):
    from pipeline_lib.workspace import Workspace

    ws = Workspace.create(tmp_path / "ws")
    (ws.catalog / "dedup-0123456789abcdef.parquet").write_bytes(b"PAR1 cut off")
    result = runner.invoke(app, ["review", "export", str(tmp_path / "todo.csv"), "--workspace", str(ws.root)])
    _one_line_exit_2(result, "CatalogError", "dedup-0123456789abcdef.parquet is damaged")
    result = runner.invoke(app, ["status", "--workspace", str(ws.root)])  # reads it with pyarrow directly
    _one_line_exit_2(result, "ArrowInvalid", "Parquet file of the workspace is damaged", "aidetect doctor")


def test_a_damaged_mlflow_store_is_named(tmp_path: Path):
    from pipeline_lib.workspace import Workspace

    ws = Workspace.create(tmp_path / "ws")
    (ws.root / "mlflow.db").write_bytes(b"this is not SQLite" * 300)
    result = runner.invoke(app, ["status", "--workspace", str(ws.root)])
    _one_line_exit_2(result, "DatabaseError", "mlflow.db")


def test_every_known_failure_type_becomes_one_line(tmp_path: Path):
    """Each type raised by the real code path that meets it, mapped to the line the CLI prints."""
    import pandas as pd

    from flows.cli import explain_failure
    from pipeline_lib import crawl, models, review, tracking
    from pipeline_lib.catalog import read_table
    from pipeline_lib.config import SourcesConfig, read_yaml_mapping
    from pipeline_lib.workspace import Ref, Workspace

    ws = Workspace.create(tmp_path / "ws")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\xff\xfe junk" * 50)
    (ws.crawl / "log.parquet").write_bytes(b"junk")
    (ws.review / "decisions.jsonl").write_text("{\n{}\n", encoding="utf-8")
    empty = tmp_path / "keywords.txt"
    empty.write_text("", encoding="utf-8")
    (tmp_path / "db").mkdir()
    (tmp_path / "db" / "mlflow.db").write_bytes(b"junk" * 400)
    sources = SourcesConfig(search=[{"keywords_file": empty, "endpoint": "http://h/?q={keyword}&first={offset}"}])
    cases = {
        "CatalogError": lambda: read_table(ws, Ref("crawl/log.parquet", "0" * 64)),
        "CrawlLogError": lambda: crawl.read_crawl_log(ws),
        "ReviewError": lambda: review.read_decisions(ws),
        "CheckpointError": lambda: models.load_model(junk),
        "ArrowInvalid": lambda: pd.read_parquet(junk),
        "ConfigError": lambda: read_yaml_mapping(junk),
        "SourceError": lambda: crawl.crawl_sources(ws, sources),
        "DatabaseError": lambda: tracking.recent_runs(f"sqlite:///{tmp_path / 'db' / 'mlflow.db'}", "aidetect"),
    }
    for name, failing in cases.items():
        try:
            failing()
        except Exception as error:  # noqa: BLE001 - what the CLI would catch
            line = explain_failure(error)
        else:
            raise AssertionError(f"{name}: no failure")
        assert line is not None and line.startswith(f"{name}: "), (name, line)
        assert "\n" not in line.strip(), line
    assert explain_failure(ZeroDivisionError("a bug")) is None, "unexpected errors keep their traceback"


def test_doctor_finds_and_repairs_what_is_safe(tmp_path: Path):
    import json as json_lib

    from pipeline_lib.workspace import Workspace

    ws = Workspace.create(tmp_path / "ws")
    (ws.catalog / "ingest-0123456789abcdef.parquet").write_bytes(b"truncated")
    (ws.review / "decisions.jsonl").write_text('{"sha256": "a", "decision": "approve", "reas', encoding="utf-8")
    (ws.models / "abc").mkdir()
    (ws.models / "abc" / "last.pt").write_bytes(b"cut off checkpoint")
    (ws.cache / ".x.npy.1234.part").write_bytes(b"half")
    result = runner.invoke(app, ["doctor", "--workspace", str(ws.root), "--json"])
    assert result.exit_code == 2, result.output
    found = {item["check"]: item for item in json_lib.loads(result.stdout)}
    assert found["snapshot"]["open"] and found["decisions"]["open"] and found["checkpoint"]["open"], found
    assert found["temporary files"]["open"]
    repaired = runner.invoke(app, ["doctor", "--workspace", str(ws.root), "--repair"])
    assert repaired.exit_code == 0, repaired.output
    assert "[repaired] snapshot" in repaired.output
    assert "damaged/catalog/ingest-0123456789abcdef.parquet" in repaired.output
    assert (ws.root / "damaged/models/abc/last.pt").is_file() and not (ws.models / "abc" / "last.pt").exists()
    assert (ws.review / "decisions.jsonl.damaged").is_file() and not list(ws.cache.glob(".*.part"))
    again = runner.invoke(app, ["doctor", "--workspace", str(ws.root)])
    assert again.exit_code == 0 and "nothing left to repair" in again.output, again.output
