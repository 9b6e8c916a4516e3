"""Flows on a workspace that lost files or is busy: Prefect results inside it, damaged snapshots rewritten,
lost store files fetched again, one writer at a time."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from flows.pipeline import crawl_flow
from pipeline_lib.core.catalog import read_snapshot
from pipeline_lib.core.config_loader import build_config
from pipeline_lib.core.workspace import Workspace, WorkspaceBusyError, file_sha256
from pipeline_lib.ops.status import latest_snapshot
from tests.conftest import make_image

pytestmark = pytest.mark.slow


def _folder(root: Path, n: int = 3) -> Path:
    for index in range(n):
        make_image(root / f"prompt-{index}" / "v.png", seed=index, size=(64, 64), fmt="PNG")
    return root


def _config(tmp_path: Path, folder: Path, refresh: bool = False):
    data = {
        "sources": {"folders": [{"path": str(folder), "label": "ai"}]},
        "execution": {"workspace": str(tmp_path / "ws"), "refresh_cache": refresh},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "system_metrics_interval_s": 0},
    }
    return build_config(data, origin="test")


def test_prefect_results_live_in_the_workspace_and_a_missing_one_is_recomputed(harness, tmp_path: Path):
    config = _config(tmp_path, _folder(tmp_path / "ai"))
    first = crawl_flow(config)
    results = tmp_path / "ws" / "prefect" / "results"
    stored = [p for p in results.iterdir() if p.is_file()] if results.is_dir() else []
    assert stored, "stage results must be stored inside the workspace, as the README says"
    assert crawl_flow(config)["states"] == {"crawl": "Completed", "ingest": "Cached"}  # the crawl always runs
    for path in stored:
        path.unlink()  # the results folder was lost (a cleanup, a copy without it)
    again = crawl_flow(config)
    assert again["states"] == {"crawl": "Completed", "ingest": "Completed"}, again["states"]
    assert again["catalog"] == first["catalog"]


def test_refresh_cache_rewrites_a_truncated_snapshot(harness, tmp_path: Path):
    folder = _folder(tmp_path / "ai")
    crawl_flow(_config(tmp_path, folder))
    workspace = Workspace.open(tmp_path / "ws")
    (snapshot,) = workspace.crawl.glob("log-*.parquet")
    good = snapshot.read_bytes()
    snapshot.write_bytes(good[: len(good) // 2])  # what a crash or a full disk leaves
    stored = sorted(workspace.store.glob("*/*.png"))[0]
    whole = stored.read_bytes()
    stored.write_bytes(whole[:64])
    result = crawl_flow(_config(tmp_path, folder, refresh=True))
    assert result["states"] == {"crawl": "Completed", "ingest": "Completed"}
    assert snapshot.read_bytes() == good, "the damaged snapshot is written again"
    assert stored.read_bytes() == whole, "the truncated store file is fetched again from its folder"


def test_a_deleted_store_file_comes_back_from_its_folder_or_is_reported_lost(harness, tmp_path: Path, caplog):
    folder = _folder(tmp_path / "ai", n=4)
    crawl_flow(_config(tmp_path, folder))
    workspace = Workspace.open(tmp_path / "ws")
    catalog = read_snapshot(workspace, workspace.ref(latest_snapshot(workspace, "ingest")))
    by_group = dict(zip(catalog["group"], zip(catalog["sha256"], catalog["path"], strict=True), strict=True))
    kept_sha, kept_path = by_group["prompt-0"]
    lost_sha, lost_path = by_group["prompt-1"]
    (workspace.root / kept_path).unlink()  # deleted by hand; the folder still has the file
    (workspace.root / lost_path).unlink()
    (folder / "prompt-1" / "v.png").unlink()  # ... and this one is gone at the source too
    make_image(folder / "prompt-9" / "v.png", seed=9, size=(64, 64), fmt="PNG")  # a new file: the crawl runs
    result = crawl_flow(_config(tmp_path, folder))
    assert result["states"]["crawl"] == "Completed"
    assert file_sha256(workspace.root / kept_path) == kept_sha, "fetched again from the folder"
    assert result["counts"]["crawl.restored"] == 1 and result["counts"]["crawl.lost"] == 1
    after = read_snapshot(workspace, workspace.ref(workspace.root / result["catalog"]))
    statuses = dict(zip(after["sha256"], after["status"], strict=True))
    assert statuses[kept_sha] == "ok" and statuses[lost_sha] == "invalid:missing_file"
    assert f"LOST: {lost_sha}" in caplog.text and "could not be fetched again" in caplog.text


HOLDER = """
import sys
from pipeline_lib.core.workspace import Workspace, workspace_lock
with workspace_lock(Workspace.create(sys.argv[1]), "aidetect run (another shell)"):
    print("locked", flush=True)
    sys.stdin.read()
"""


def test_a_second_run_on_a_busy_workspace_stops_at_once_naming_the_holder(harness, tmp_path: Path):
    config = _config(tmp_path, _folder(tmp_path / "ai"))
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path / "ws")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        state = crawl_flow(config, return_state=True)
        assert state.is_failed()
        with pytest.raises(WorkspaceBusyError, match=f"pid {holder.pid} .*aidetect run \\(another shell\\)"):
            state.result()
        assert not list((tmp_path / "ws" / "catalog").iterdir()), "nothing was written by the refused run"
        result = CliRunner().invoke(app, ["crawl", "--workspace", str(tmp_path / "ws"), "--set", "sources.folders=[]"])
        assert result.exit_code == 2 and f"pid {holder.pid}" in result.output and "in use" in result.output
    finally:
        holder.stdin.close()
        holder.wait()
    assert crawl_flow(config)["states"]["ingest"] == "Completed", "free again once the holder is done"
