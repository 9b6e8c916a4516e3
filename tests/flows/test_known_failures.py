"""Known failures of a workspace through the real `aidetect` command, each one line and exit 2 before any stage runs:
a command that loses the workspace lock (and changes nothing), a path that cannot hold a workspace, a read-only
workspace, a damaged mlflow.db, an unknown layout version; a copied workspace that keeps its runs and models to
itself; and no Prefect traceback on the console for a known failure inside a flow."""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
from prefect.settings import PREFECT_API_URL
from typer.testing import CliRunner

from flows.cli import app
from pipeline_lib.acquire.imports import add_import, imports_path
from pipeline_lib.assess.registry import register_model
from pipeline_lib.core.catalog import new_rows, write_snapshot
from pipeline_lib.core.config import FolderSource
from pipeline_lib.core.tracking.logged_models import log_pytorch_model
from pipeline_lib.core.tracking.runs import start_run
from pipeline_lib.core.tracking.store import tracking_uri
from pipeline_lib.core.tracking.workspace_store import LOCATION_COLUMNS
from pipeline_lib.core.workspace import Workspace, put_in_store
from pipeline_lib.learn import models
from tests.conftest import hold_workspace_lock, make_image
from tests.core.tracking.test_workspace_store import damage_table
from tests.flows.test_cli import AIDETECT, IMPORTS_PROBE, _child, _child_env, _crawl_config

runner = CliRunner()


def _tree(root: Path) -> dict[str, str]:
    """Every file and folder under root: its content's sha256 ('' for a folder)."""
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
        for path in sorted(root.rglob("*"))
    }


def _one_line(result: CliRunner | subprocess.CompletedProcess, *words: str) -> str:
    """The single line a failed command printed (exit 2, no traceback), checked for words."""
    code = result.returncode if isinstance(result, subprocess.CompletedProcess) else result.exit_code
    text = result.stderr if isinstance(result, subprocess.CompletedProcess) else result.output
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("LOADED:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in text, (code, text)
    assert all(word in lines[0] for word in words), (words, lines[0])
    return lines[0]


def _imported_workspace(tmp_path: Path) -> Workspace:
    """A workspace with an imported folder, a stored image and a catalog snapshot (what a first import leaves)."""
    workspace = Workspace.create(tmp_path / "ws")
    image = make_image(tmp_path / "first" / "p" / "a.png", seed=1, fmt="PNG")
    add_import(workspace, FolderSource(path=tmp_path / "first", label="ai"))
    sha, stored = put_in_store(workspace, image.read_bytes(), "png")
    row = {"sha256": sha, "path": workspace.relative(stored), "label": "ai", "group": "p", "status": "ok"}
    write_snapshot(workspace, "ingest", new_rows([row]))
    return workspace


def test_a_command_that_loses_the_workspace_lock_changes_nothing_and_names_the_holder(tmp_path: Path):
    workspace = _imported_workspace(tmp_path)
    make_image(tmp_path / "second" / "q" / "b.png", seed=2, fmt="PNG")
    into = ["--workspace", str(workspace.root)]
    config = str(_crawl_config(tmp_path))
    in_process = [
        ["crawl", "--config", config, *into],
        ["run", "--config", config, *into],
        ["demo", *into],
        ["doctor", "--repair", *into],
    ]
    holder = hold_workspace_lock(workspace.root)  # the real lock, from another process
    try:
        before = _tree(workspace.root)
        # The import of the issue in a process of its own: exactly one line on its stderr.
        second_import = [*AIDETECT, "import", str(tmp_path / "second"), "--label", "ai", *into]
        results = [_child(second_import, _child_env(tmp_path))]
        results += [runner.invoke(app, args) for args in in_process]
        after = _tree(workspace.root)
    finally:
        holder.stdin.close()
        holder.wait()
    for result in results:
        _one_line(result, "WorkspaceBusyError", f"pid {holder.pid}", "aidetect run (test holder)", "is in use")
    assert after == before, "a command that lost the lock changed the workspace"
    assert str(tmp_path / "second") not in imports_path(workspace).read_text(encoding="utf-8")


def test_the_loser_of_two_imports_into_a_new_workspace_records_nothing(tmp_path: Path):
    folder = tmp_path / "new"
    folder.mkdir()
    make_image(tmp_path / "second" / "q" / "b.png", seed=2, fmt="PNG")
    config = str(_crawl_config(tmp_path))
    commands = [
        ["import", str(tmp_path / "second"), "--label", "ai", "--workspace", str(folder)],
        ["crawl", "--config", config, "--workspace", str(folder)],
        ["run", "--config", config, "--workspace", str(folder)],
    ]
    holder = hold_workspace_lock(folder, create=False)  # the winner holds the folder, the workspace not made yet
    try:
        before = _tree(folder)
        results = [runner.invoke(app, args) for args in commands]
        after = _tree(folder)
    finally:
        holder.stdin.close()
        holder.wait()
    for result in results:
        _one_line(result, "WorkspaceBusyError", f"pid {holder.pid}")
    assert after == before == {".aidetect.lock": after[".aidetect.lock"]}, "the loser made or recorded something"


def test_a_path_that_cannot_hold_a_workspace_is_named_in_one_line(tmp_path: Path):
    a_file = tmp_path / "ws.txt"
    a_file.write_text("notes", encoding="utf-8")
    cache_is_a_file = Workspace.create(tmp_path / "cache-file")
    cache_is_a_file.cache.rmdir()
    cache_is_a_file.cache.write_text("", encoding="utf-8")
    newer = Workspace.create(tmp_path / "newer")
    (newer.root / ".aidetect-workspace").write_text("aidetect workspace v99\n", encoding="utf-8")
    image = make_image(tmp_path / "images" / "p" / "a.png", fmt="PNG")
    cases = {
        a_file: [str(a_file), "is a file, not a folder", "pass --workspace"],
        cache_is_a_file.root: [f"{cache_is_a_file.cache} is a file", "cache/ folder", "move it aside"],
        newer.root: ["layout v99", "newer than this aidetect understands (v1)"],
    }
    commands = [["run"], ["crawl"], ["status"], ["import", str(image.parent.parent), "--label", "ai"]]
    for root, words in cases.items():
        before = _tree(root) if root.is_dir() else {"": hashlib.sha256(root.read_bytes()).hexdigest()}
        for args in [*commands, ["predict", str(image)]]:
            _one_line(runner.invoke(app, [*args, "--workspace", str(root)]), "UnusableWorkspaceError", *words)
        assert (_tree(root) if root.is_dir() else {"": hashlib.sha256(root.read_bytes()).hexdigest()}) == before
    # Before any stage: Prefect is not even imported (it failed after 129 s inside Prefect's flow before).
    probe = _child([sys.executable, "-c", IMPORTS_PROBE, "run", "--workspace", str(a_file)], _child_env(tmp_path))
    _one_line(probe, "is a file")
    assert "prefect" not in probe.stderr.split("LOADED:")[1], probe.stderr


def _read_only(folder: Path, command: list[str]) -> list[str]:
    """command run where folder is mounted read-only (a private mount namespace: nothing else sees the mount)."""
    script = 'mount --bind "$1" "$1" && mount -o remount,ro,bind "$1" && shift && exec "$@"'
    return ["unshare", "--mount", "sh", "-c", script, "sh", str(folder), *command]


def _can_mount_read_only() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = Path(__file__).resolve().parent
    return subprocess.run(_read_only(probe, ["true"]), capture_output=True, check=False).returncode == 0


@pytest.mark.skipif(not _can_mount_read_only(), reason="mounting a folder read-only needs `unshare --mount` rights")
def test_a_read_only_workspace_is_named_in_one_line_and_can_still_be_read(tmp_path: Path):
    folder = tmp_path / "readonly"
    workspace = _imported_workspace(folder)
    make_image(tmp_path / "second" / "q" / "b.png", seed=2, fmt="PNG")
    env = _child_env(tmp_path)
    into = ["--workspace", str(workspace.root)]
    lock_file = f"is not writable (Read-only file system: {workspace.root / '.aidetect.lock'})"
    refused = {
        lock_file: [["import", str(tmp_path / "second"), "--label", "ai", *into], ["run", *into]],
        f"cannot make workspace {folder / 'new'}: {folder} is not writable": [["crawl", "-w", str(folder / "new")]],
    }
    for words, commands in refused.items():
        for args in commands:
            _one_line(_child(_read_only(folder, [*AIDETECT, *args]), env), "UnusableWorkspaceError", words)
    status = _child(_read_only(folder, [*AIDETECT, "status", *into, "--json"]), env)
    assert status.returncode == 0 and json.loads(status.stdout)["images"] == 1, status.stderr


def test_a_damaged_mlflow_db_is_named_by_status_and_stops_run_before_any_stage(tmp_path: Path):
    workspace = _imported_workspace(tmp_path)
    uri = tracking_uri(None, workspace)
    start_run(uri, "aidetect", workspace, "an earlier run")
    register = start_run(uri, "aidetect", workspace, "registry").client
    register.create_registered_model("aidetect")
    damage_table(workspace.root / "mlflow.db", "registered_models")  # MLflow still starts runs: found at registration
    database = str(workspace.root / "mlflow.db")
    status = runner.invoke(app, ["status", "--workspace", str(workspace.root)])
    assert status.exit_code == 2 and str(workspace.root) in status.stdout, status.output  # the report, then the line
    assert "TrackingStoreError" in status.stderr and database in status.stderr and "move it aside" in status.stderr
    info = json.loads(runner.invoke(app, ["status", "--workspace", str(workspace.root), "--json"]).stdout)
    assert database in info["tracking_error"]
    snapshots = sorted(workspace.catalog.iterdir())
    result = runner.invoke(app, ["run", "--workspace", str(workspace.root), "--config", str(_crawl_config(tmp_path))])
    _one_line(result, "TrackingStoreError", database, f"mv {database} {database}.damaged")
    assert sorted(workspace.catalog.iterdir()) == snapshots, "a stage ran"


def _champion(workspace: Workspace, tmp_path: Path) -> None:
    """A registered champion in the workspace's store (a tiny resnet18 with its checkpoint beside it)."""
    torch.manual_seed(0)
    model, _ = models.build_model("resnet18", "none")
    checkpoint = tmp_path / "model.pt"
    models.save_checkpoint(checkpoint, model, {"image_size": 32})
    tracker = start_run(tracking_uri(None, workspace), "aidetect", workspace, "a run")
    example = np.random.rand(1, 3, 32, 32).astype("float32")
    logged = log_pytorch_model(tracker, model, example, ["torch"], checkpoint=checkpoint)
    register_model(tracker, logged, "aidetect", 0.9, "t", "m", image_size=32, architecture="resnet18")
    tracker.finish()


def test_a_copied_workspace_runs_and_loads_on_its_own_after_the_original_is_gone(harness, tmp_path: Path):
    config = str(_crawl_config(tmp_path))
    original = tmp_path / "original"
    assert runner.invoke(app, ["crawl", "--config", config, "--workspace", str(original)]).exit_code == 0
    _champion(Workspace.open(original), tmp_path)
    copy = shutil.copytree(original, tmp_path / "copy")
    shutil.rmtree(original)
    result = runner.invoke(app, ["crawl", "--config", config, "--workspace", str(copy)])
    assert result.exit_code == 0, result.output
    image = make_image(tmp_path / "new.jpg", seed=5)
    result = runner.invoke(app, ["predict", str(image), "--workspace", str(copy), "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)[0]["error"] is None, result.output
    _champion(Workspace.open(copy), tmp_path)  # a second model logged and registered from the copy
    assert not original.exists(), f"the copy wrote into the original: {sorted(original.rglob('*'))}"
    with sqlite3.connect(copy / "mlflow.db") as connection:
        places = [
            row[0]
            for table, column in LOCATION_COLUMNS
            for row in connection.execute(f"SELECT {column} FROM {table}")
            if row[0] and "mlartifacts" in row[0]
        ]
    assert len(places) >= 8 and all(p.startswith((copy / "mlartifacts").as_uri()) for p in places), places


def test_a_known_failure_inside_a_flow_prints_no_prefect_traceback_but_prefect_keeps_it(harness, tmp_path: Path):
    folder = tmp_path / "ai"
    for index in range(3):
        make_image(folder / f"prompt-{index}" / "v.png", seed=index, size=(64, 64), fmt="PNG")
    config = tmp_path / "config.yaml"
    config.write_text(
        f"sources:\n  folders:\n    - path: {folder}\n      label: ai\ntrain:\n  weights: none\nreview:\n  mode: off\n",
        encoding="utf-8",
    )
    env = _child_env(tmp_path) | {"PREFECT_API_URL": str(PREFECT_API_URL.value())}
    result = _child([*AIDETECT, "run", "--config", str(config), "--workspace", str(tmp_path / "ws")], env)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("SplitError: label 'real' has too few groups")
    stages = [line.split()[:2] for line in result.stdout.splitlines()]
    assert ["crawl", "computed"] in stages and ["split", "computed"] in stages, f"no stage lines: {result.stdout}"
    workspace = json.dumps(str(tmp_path / "ws"))
    with get_client(sync_client=True) as client:
        (flow_run,) = [run for run in client.read_flow_runs() if workspace in json.dumps(run.parameters)]
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id])))
    assert any("Traceback" in log.message and "SplitError" in log.message for log in logs), "not kept in its logs"
    said = [log.message.split()[:2] for log in logs]
    assert ["crawl", "computed"] in said and ["split", "computed"] in said, f"no stage lines in the run's logs: {said}"
