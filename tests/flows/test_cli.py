"""The `aidetect` command: input checked before Prefect starts (exit 2), import accounting, crawl, review, status,
serve, ui, fetching weights, and the one-line exit 4 when Prefect's temporary server cannot start."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import torch
from PIL import Image
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL
from typer.testing import CliRunner

from flows.cli import app
from pipeline_lib.core.config_loader import load_config
from pipeline_lib.core.workspace import Workspace
from tests.conftest import files_holding, make_image
from tests.flows.gate_helpers import DEADLINE_S, gate_flow
from tests.flows.mlflow_server import free_port, stop, wait_healthy
from tests.loopback import closed_port_url, serve_files
from tests.network_guard import guarded_environment, read_log

runner = CliRunner()
REPO = Path(__file__).resolve().parents[2]
AIDETECT = [sys.executable, "-c", "from flows.cli import main; main()"]
# Prints which heavy libraries the command imported, after it exits (input errors must need none of them).
IMPORTS_PROBE = (
    "import atexit, sys\n"
    "atexit.register(lambda: print('LOADED:' + ','.join(m for m in ('prefect', 'torch', 'mlflow') if m in sys.modules),"
    " file=sys.stderr))\n"
    "from flows.cli import main\n"
    "sys.argv = ['aidetect', *sys.argv[1:]]\n"
    "main()\n"
)


def _child(args: list[str], env: dict[str, str], timeout: float = DEADLINE_S) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def _child_env(tmp_path: Path) -> dict[str, str]:
    env, _ = guarded_environment(tmp_path / "guard")
    return env | {"PREFECT_HOME": str(tmp_path / "prefect-home")}


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


def test_bad_input_exits_2_before_prefect_torch_or_mlflow_are_imported(tmp_path: Path):
    images = tmp_path / "images"
    make_image(images / "a.jpg", seed=1)
    empty, texts = tmp_path / "empty", tmp_path / "texts"
    empty.mkdir()
    (empty / ".DS_Store").write_bytes(b"\0")
    (texts / "sub").mkdir(parents=True)
    (texts / "sub" / "notes.txt").write_text("a note", encoding="utf-8")
    ws = tmp_path / "ws"
    missing_source = tmp_path / "missing.yaml"
    missing_source.write_text(f"sources:\n  folders:\n    - path: {tmp_path / 'gone'}\n      label: ai\n", "utf-8")
    into = ["--workspace", str(ws)]
    cases = [
        (["import", str(images), "--label", "ai", "--group-by", "pattern:([", *into], ["--group-by", "regular exp"]),
        (["import", str(images), "--label", "ai", "--group-by", "csv:nope.csv", *into], ["nope.csv"]),
        (["import", str(empty), "--label", "ai", *into], ["empty"]),
        (["import", str(texts), "--label", "ai", *into], ["no images", "notes.txt", "not an image (text)"]),
        (["import", str(tmp_path / "gone"), "--label", "ai", *into], ["does not exist"]),
        (["import", str(images), "--label", "ai", "--set", "train.epochs=zero", *into], ["train.epochs"]),
        (["run", "--config", str(missing_source), *into], ["sources.folders[0]", "gone"]),
        (["predict", str(images), "--workspace", str(tmp_path / "nowhere")], ["nowhere"]),
        (["status", "--workspace", str(tmp_path / "nowhere")], ["nowhere"]),
    ]
    env = _child_env(tmp_path)
    for args, words in cases:
        result = _child([sys.executable, "-c", IMPORTS_PROBE, *args], env)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        message = "\n".join(line for line in result.stderr.splitlines() if not line.startswith("LOADED:"))
        assert "Traceback" not in message and message.count("\n") <= 1, (args, message)  # one message (a config
        assert all(word in message for word in words), (args, message)  # error says "invalid configuration" first)
        assert "LOADED:\n" in result.stderr + "\n", (args, result.stderr)  # neither prefect, torch nor mlflow
    assert not (ws / "crawl" / "imports.json").exists(), "a refused import must save nothing"


def test_prefect_server_that_does_not_start_gives_one_line_and_exit_4(tmp_path: Path):
    images = tmp_path / "images"
    make_image(images / "p" / "a.png", seed=1, fmt="PNG")
    # A limit of 0 s: Prefect starts the server process but never asks it for an answer, so the start fails on any
    # machine, busy or not (no race between the server and a short wait).
    env = _child_env(tmp_path) | {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "0"}
    result = _child([*AIDETECT, "import", str(images), "--label", "ai", "--workspace", str(tmp_path / "ws")], env)
    assert result.returncode == 4, (result.stdout, result.stderr)
    errors = [line for line in result.stderr.splitlines() if "did not start" in line]
    assert len(errors) == 1 and "PREFECT_API_URL" in errors[0] and "2 tries" in errors[0], result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "ws" / "crawl" / "imports.json").exists()
    debug = _child([*AIDETECT, "--debug", "import", str(images), "--label", "ai", "-w", str(tmp_path / "ws")], env)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "PrefectStartError" in debug.stderr


def test_import_accounts_for_every_file_and_status_shows_it(harness, tmp_path: Path):
    folder = tmp_path / "midjourney"
    for index in range(3):
        make_image(folder / "prompt-a" / f"v{index}.png", seed=index, size=(64, 64), fmt="PNG")
    make_image(folder / "prompt-b" / "v0.jpg", seed=9, size=(64, 64))
    make_image(folder / "prompt-b" / "no_extension", seed=10, size=(64, 64))  # a JPEG without a suffix
    (folder / "prompt-b" / "broken.jpg").write_bytes(b"<html>not an image</html>")
    (folder / "notes.txt").write_text("prompts used", encoding="utf-8")
    make_image(folder / ".hidden.png", seed=11, fmt="PNG")
    make_image(folder / ".thumbs" / "t.png", seed=12, fmt="PNG")
    ws = tmp_path / "ws"
    result = runner.invoke(app, ["import", str(folder), "--label", "fake", "--workspace", str(ws)])
    assert result.exit_code == 2 and "--label" in result.output
    args = ["import", str(folder), "--label", "ai", "--generator", "mj", "--workspace", str(ws), "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout[result.stdout.index("{") : result.stdout.rindex("}") + 1])
    assert summary["counts"]["ingest.ok"] == 5 and summary["counts"]["ingest.invalid"] == 1
    outcomes = {item["name"]: (item["outcome"], item["reason"]) for item in summary["folders"][0]["files"]}
    assert len(outcomes) == 7, outcomes  # every file that is not hidden, and only those
    assert outcomes["prompt-b/no_extension"] == ("imported", "")
    assert outcomes["prompt-b/broken.jpg"] == ("quarantined", "not_an_image:html")
    assert outcomes["notes.txt"] == ("left out", "not an image (text)")
    assert sum(outcome == "imported" for outcome, _ in outcomes.values()) == 5

    status = runner.invoke(app, ["status", "--workspace", str(ws), "--json"])
    info = json.loads(status.stdout)
    assert info["label"] == {"ai": 5}
    assert len(info["imports"][0]["files"]) == 7 and info["runs"][0]["kind"] == "crawl"
    text = runner.invoke(app, ["status", "--workspace", str(ws)]).stdout
    assert "7 file(s) in" in text and "5 imported, 1 quarantined, 1 left out" in text, text
    assert "notes.txt: not an image (text)" in text and "{" not in text, text


def test_import_after_a_run_accounts_for_every_file_and_never_reads_outside_the_folder(
    harness, tmp_path: Path, outside_secret: Path
):
    ws = tmp_path / "ws"
    gate_flow(load_config(_crawl_config(tmp_path), [f"execution.workspace={ws}", "review.mode=off"]))  # a run's data
    folder = tmp_path / "dataQ"
    for index in range(3):
        make_image(folder / "q" / f"{index}.png", seed=40 + index, size=(64, 64), fmt="PNG")
    (folder / "q" / "broken.jpg").write_bytes(b"<html>not an image</html>")
    (folder / "shadow.png").symlink_to(outside_secret)
    (folder / "inside.png").symlink_to(folder / "q" / "0.png")
    result = runner.invoke(app, ["import", str(folder), "--label", "ai", "--workspace", str(ws)])
    assert result.exit_code == 0, result.output
    line = f"6 file(s) in {folder} (label ai): 3 imported, 1 quarantined, 2 left out"
    assert line in result.stdout and "not seen yet" not in result.stdout, result.stdout
    assert "shadow.png: symlink\n" in result.stdout and "inside.png: symlink\n" in result.stdout, result.stdout
    status = runner.invoke(app, ["status", "--workspace", str(ws)]).stdout
    assert line in status and "not seen yet" not in status, status

    args = ["import", str(folder), "--label", "ai", "--follow-symlinks", "--workspace", str(ws)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "4 imported, 1 quarantined, 1 left out" in result.stdout, result.stdout
    assert "shadow.png: symlink outside the folder" in result.stdout, result.stdout
    assert files_holding(ws, outside_secret.read_bytes()) == [], "the file outside the folder was read"


def _crawl_config(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    seed = 100
    for label in ("real", "ai"):
        for group in ("g1", "g2"):
            for index in range(2):
                seed += 1
                make_image(data / label / f"{label}-{group}" / f"{index}.png", seed=seed, size=(72, 64), fmt="PNG")
    config = tmp_path / "crawl.yaml"
    config.write_text(
        "sources:\n  folders:\n"
        f"    - path: {data / 'real'}\n      label: real\n    - path: {data / 'ai'}\n      label: ai\n",
        encoding="utf-8",
    )
    return config


def test_crawl_then_review_export_apply_status_serve_and_done(harness, tmp_path: Path):
    ws = tmp_path / "ws"
    result = runner.invoke(app, ["crawl", "--config", str(_crawl_config(tmp_path)), "--workspace", str(ws)])
    assert result.exit_code == 0, result.output
    assert "Ingest: 8 image(s) ok, 0 quarantined" in result.stdout and "folder:real" in result.stdout, result.stdout
    result = runner.invoke(app, ["review", "export", str(tmp_path / "todo.csv"), "--workspace", str(ws)])
    assert result.exit_code == 2 and "run the pipeline" in result.output  # crawl makes no dedup snapshot yet
    assert json.loads(runner.invoke(app, ["status", "-w", str(ws), "--json"]).stdout)["images"] == 8
    cfg = load_config(tmp_path / "crawl.yaml", [f"execution.workspace={ws}", "review.mode=off"])
    gate_flow(cfg)  # crawl, ingest, fingerprint, dedup (the review pack needs the dedup snapshot)
    result = runner.invoke(app, ["review", "queue", "--workspace", str(ws), "--json"])
    assert result.exit_code == 0, result.output
    queue = json.loads(result.stdout)
    assert queue["scorer"] == "" and queue["note"].startswith("no champion and no trained model"), queue
    assert len(queue["images"]) == 8 and set(queue["images"][0]) == {
        "sha256", "label", "group", "suspicion", "suggested", "reject_reason", "why", "reasons"
    }, queue["images"][0]  # fmt: skip
    text = runner.invoke(app, ["review", "queue", "--workspace", str(ws)]).stdout.splitlines()
    assert text[0].startswith("8 image(s) to review") and len(text) == 9, text
    todo = tmp_path / "todo.csv"
    result = runner.invoke(app, ["review", "export", str(todo), "--workspace", str(ws)])
    assert result.exit_code == 0 and "8 undecided image(s)" in result.stdout, result.output
    rows = list(csv.DictReader(todo.open(encoding="utf-8")))
    for index, row in enumerate(rows):
        row["decision"] = "reject" if index == 0 else "approve"
    with todo.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    result = runner.invoke(app, ["review", "apply", str(todo), "--workspace", str(ws)])
    assert result.exit_code == 0 and "8 decision(s) recorded" in result.stdout, result.output
    result = runner.invoke(app, ["review", "status", "--workspace", str(ws)])
    assert result.stdout.strip() == "approved: 7, rejected: 1, undecided: 0", result.stdout
    result = runner.invoke(app, ["review", "done", "--workspace", str(ws)])
    assert result.exit_code == 2 and "no flow run waits" in result.output

    port = free_port()
    server = subprocess.Popen(
        [*AIDETECT, "review", "serve", "--workspace", str(ws), "--port", str(port)],
        cwd=REPO, env=_child_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_healthy(f"http://127.0.0.1:{port}/", server, DEADLINE_S)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as response:
            page = response.read().decode("utf-8")
    finally:
        stop(server)
    assert "finish review" in page.lower(), page[:500]


def test_review_timeout_exits_3_with_how_to_continue(harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    folder = tmp_path / "ai"
    for index in range(2):
        make_image(folder / "prompt-a" / f"v{index}.png", seed=index, size=(64, 64), fmt="PNG")
    name, data = _hashed_weights()
    config = tmp_path / "config.yaml"
    # review.timeout_hours 0.0003 is the gate's shortest timeout (1 s), and its end is what this test waits for:
    # nobody resumes the run, so nothing races it and a busy machine only makes the run end later.
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
    from pipeline_lib.core.workspace import Workspace
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
    from pipeline_lib.core.catalog import new_rows, write_snapshot
    from pipeline_lib.core.workspace import Workspace
    from pipeline_lib.curate.review import Decision, append_decisions, thumbnail_path

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


def test_serve_needs_a_server_then_serves_the_deployments(harness, tmp_path: Path):
    closed = f"http://127.0.0.1:{free_port()}/api"
    result = _child([*AIDETECT, "serve"], _child_env(tmp_path) | {"PREFECT_API_URL": closed})
    assert result.returncode == 2 and "no Prefect server answers" in result.stderr, result.stderr
    api = str(PREFECT_API_URL.value())
    server = subprocess.Popen(
        [*AIDETECT, "serve"], cwd=REPO, env=_child_env(tmp_path) | {"PREFECT_API_URL": api},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        names = _wait_for_deployments(server, {"recrawl-and-retrain", "retrain", "crawl"})
    finally:
        stop(server)
    assert {"recrawl-and-retrain", "retrain", "crawl"} <= names


def _wait_for_deployments(server: subprocess.Popen, wanted: set[str], seconds: float = DEADLINE_S) -> set[str]:
    """The deployment names the harness server holds once `wanted` are all there (raise if serve exits first)."""
    import time

    deadline = time.monotonic() + seconds
    with get_client(sync_client=True) as client:
        while True:
            names = {deployment.name for deployment in client.read_deployments()}
            if wanted <= names or server.poll() is not None or time.monotonic() > deadline:
                return names
            time.sleep(0.5)


def test_ui_serves_the_workspace_store_with_telemetry_off(tmp_path: Path):
    ws = Workspace.create(tmp_path / "ws")
    port = free_port()
    env, log = guarded_environment(tmp_path / "guard")
    server = subprocess.Popen(
        [*AIDETECT, "ui", "--workspace", str(ws.root), "--port", str(port)], cwd=REPO, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_healthy(f"http://127.0.0.1:{port}/health", server, DEADLINE_S)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ajax-api/3.0/mlflow/ui-telemetry", timeout=30) as r:
            telemetry = json.loads(r.read().decode("utf-8"))
    finally:
        stop(server)
    assert telemetry["disable_ui_telemetry"] is True, telemetry
    assert (ws.root / "mlflow.db").is_file()
    assert not [entry for entry in read_log(log) if entry["kind"] == "remote"], read_log(log)
    assert os.environ.get("MLFLOW_DISABLE_TELEMETRY") in (None, "true")


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
    _one_line_exit_2(result, "config file", "latin1.yaml", "not UTF-8")


def test_a_corrupt_decisions_line_is_named(tmp_path: Path):
    from pipeline_lib.core.workspace import Workspace

    ws = Workspace.create(tmp_path / "ws")
    (ws.review / "decisions.jsonl").write_text('{"oops"\n{"sha256": "a", "decision": "approve"}\n', encoding="utf-8")
    result = runner.invoke(app, ["review", "status", "--workspace", str(ws.root)])
    _one_line_exit_2(result, "ReviewError", "decisions.jsonl:1", "aidetect doctor")


def test_a_damaged_snapshot_is_named(tmp_path: Path):
    from pipeline_lib.core.workspace import Workspace

    ws = Workspace.create(tmp_path / "ws")
    (ws.catalog / "dedup-0123456789abcdef.parquet").write_bytes(b"PAR1 cut off")
    result = runner.invoke(app, ["review", "export", str(tmp_path / "todo.csv"), "--workspace", str(ws.root)])
    _one_line_exit_2(result, "CatalogError", "dedup-0123456789abcdef.parquet is damaged")
    result = runner.invoke(app, ["status", "--workspace", str(ws.root)])  # reads it with pyarrow directly
    _one_line_exit_2(result, "ArrowInvalid", "Parquet file of the workspace is damaged", "aidetect doctor")


def test_a_damaged_mlflow_store_is_named(tmp_path: Path):
    from pipeline_lib.core.workspace import Workspace

    ws = Workspace.create(tmp_path / "ws")
    (ws.root / "mlflow.db").write_bytes(b"this is not SQLite" * 300)
    image = make_image(tmp_path / "a.jpg")
    result = runner.invoke(app, ["predict", str(image), "--workspace", str(ws.root)])  # the champion: from mlflow.db
    _one_line_exit_2(result, "DatabaseError", "mlflow.db")


def test_every_known_failure_type_becomes_one_line(tmp_path: Path):
    """Each type raised by the real code path that meets it, mapped to the line the CLI prints."""
    import pandas as pd

    from flows.cli import explain_failure
    from pipeline_lib.acquire import crawl, crawl_log
    from pipeline_lib.core.catalog import read_table
    from pipeline_lib.core.config import SourcesConfig
    from pipeline_lib.core.config_loader import read_yaml_mapping
    from pipeline_lib.core.tracking.runs import recent_runs
    from pipeline_lib.core.workspace import Ref, Workspace
    from pipeline_lib.curate import review
    from pipeline_lib.learn import models

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
        "CrawlLogError": lambda: crawl_log.read_crawl_log(ws),
        "ReviewError": lambda: review.read_decisions(ws),
        "CheckpointError": lambda: models.load_model(junk),
        "ArrowInvalid": lambda: pd.read_parquet(junk),
        "ConfigError": lambda: read_yaml_mapping(junk),
        "SourceError": lambda: crawl.crawl_sources(ws, sources),
        "DatabaseError": lambda: recent_runs(f"sqlite:///{tmp_path / 'db' / 'mlflow.db'}", "aidetect"),
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

    from pipeline_lib.core.workspace import Workspace

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
