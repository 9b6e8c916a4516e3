"""SIGKILL a real `aidetect run` during ingest, during preprocessing and during training, then run it again:
the same catalog and, on the CPU, the same final weights as a run that was never interrupted.

The runs are subprocesses with the same environment; each kill waits on an event (a task-run line in the run's
output, a file appearing), never on a sleep. The first killed run starts Prefect's temporary server itself, which
must die with it; the others use the test harness's server. All share one MLflow store (created once).
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import psutil
import pytest
import torch

from flows.lifeline import SERVER_MARK
from pipeline_lib.core.catalog import read_parquet_file
from pipeline_lib.core.tracking.runs import WORKSPACE_TAG, recent_runs, run_summary
from pipeline_lib.core.workspace import Workspace
from pipeline_lib.ops.demo_data import generate_demo_dataset
from pipeline_lib.ops.status import latest_snapshot

pytestmark = pytest.mark.slow
EPOCHS = 3
EVENT_LIMIT_S = 600  # how long to wait for an event before the test gives up (never reached when things work)


def _config(tmp_path: Path) -> Path:
    data = generate_demo_dataset(tmp_path / "data", n_persons_per_class=4, image_size=48, seed=5)
    path = tmp_path / "config.yaml"
    path.write_text(
        f"""
sources:
  folders:
    - {{path: {data.site_dir}, label: real}}
    - {{path: {data.ai_dir}, label: ai}}
review: {{mode: auto}}
split: {{train: 0.5, val: 0.25, test: 0.25, min_groups_per_label: 1}}
train: {{model: resnet18, weights: none, image_size: 32, batch_size: 8, epochs: {EPOCHS}, head_only_epochs: 1,
         patience: 8, num_workers: 0}}
evaluate: {{bootstrap: 10}}
report: {{images_per_cell: 1}}
audit: {{enabled: false}}
tracking: {{system_metrics_interval_s: 0, uri: "sqlite:///{tmp_path / 'mlflow.db'}"}}
execution: {{chunk_size: 1, max_workers: 1}}
""",
        encoding="utf-8",
    )
    return path


class Run:
    """`aidetect run` in a subprocess, its output read line by line into a queue by a thread."""

    def __init__(self, config: Path, workspace: Path, env: dict[str, str]) -> None:
        # --verbose: Prefect's task-run lines (the events this test waits for) on the console
        command = [sys.executable, "-m", "flows.cli", "--verbose", "run", "-c", str(config), "-w", str(workspace)]
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.output.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def wait_for_line(self, needle: str) -> None:
        """Block until a line containing needle appears (fail if the run ends first)."""
        while True:
            line = self.lines.get(timeout=EVENT_LIMIT_S)
            assert line is not None, f"the run ended before {needle!r}:\n{''.join(self.output[-40:])}"
            if needle in line:
                return

    def wait_for(self, condition: Callable[[], bool], what: str) -> None:
        """Block until condition() holds while the run goes on (a file appearing), checking every 20 ms."""
        deadline = time.monotonic() + EVENT_LIMIT_S
        while not condition():
            assert self.process.poll() is None, f"the run ended before {what}:\n{''.join(self.output[-40:])}"
            assert time.monotonic() < deadline, f"no {what} after {EVENT_LIMIT_S} s"
            time.sleep(0.02)

    def kill(self) -> None:
        assert self.process.poll() is None, "the run finished before it could be killed"
        self.process.send_signal(signal.SIGKILL)
        assert self.process.wait() == -signal.SIGKILL

    def finish(self) -> str:
        assert self.process.wait(timeout=EVENT_LIMIT_S) == 0, "".join(self.output[-60:])
        return "".join(self.output)


def _env(tmp_path: Path, api_url: str | None) -> dict[str, str]:
    """The same environment for every run, thread counts included (a Dask nanny in this process sets
    OMP_NUM_THREADS=1 in os.environ; the reference and the killed runs must not differ in that)."""
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect-home"), PYTHONUNBUFFERED="1")
    env |= dict.fromkeys(("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"), "1")
    env.pop("PREFECT_API_URL", None)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def _temporary_servers(pid: int) -> list[psutil.Process]:
    """The temporary Prefect server(s) a run started (uvicorn serving Prefect's app), not their watchdog."""
    found = []
    for child in psutil.Process(pid).children(recursive=True):
        cmdline = " ".join(child.cmdline())
        if SERVER_MARK in cmdline and "uvicorn" in cmdline:
            found.append(child)
    return found


def _catalog(workspace: Path) -> pd.DataFrame:
    table = read_parquet_file(latest_snapshot(Workspace.open(workspace), "split"))
    return table.drop(columns=["fetched_at"]).sort_values(["sha256", "url"]).reset_index(drop=True)


def _weights(workspace: Path) -> tuple[dict[str, torch.Tensor], list[dict]]:
    (best,) = (workspace / "models").glob("*/best.pt")
    last = torch.load(best.with_name("last.pt"), map_location="cpu", weights_only=True)
    return torch.load(best, map_location="cpu", weights_only=True)["state_dict"], last["history"]


def _last_epoch(workspace: Path) -> int:
    (last,) = (workspace / "models").glob("*/last.pt")
    return int(torch.load(last, map_location="cpu", weights_only=True)["epoch"])


def test_killed_during_ingest_preprocess_and_training_then_continued(harness, tmp_path: Path):
    from prefect.settings import PREFECT_API_URL

    config, api = _config(tmp_path), str(PREFECT_API_URL.value())
    Run(config, tmp_path / "reference", _env(tmp_path, api)).finish()  # never interrupted
    ws = tmp_path / "ws"

    # 1. Killed during ingest (this run starts the temporary Prefect server itself: it must stop with the run).
    during_ingest = Run(config, ws, _env(tmp_path, None))
    during_ingest.wait_for_line("Task run 'ingest-validate-chunk")
    servers = _temporary_servers(during_ingest.process.pid)
    assert servers, "the run should have started a temporary Prefect server"
    during_ingest.kill()
    assert not list((ws / "catalog").glob("ingest-*.parquet")), "killed before ingest finished"
    gone, alive = psutil.wait_procs(servers, timeout=EVENT_LIMIT_S)
    assert not alive, "the temporary Prefect server outlived the run that started it"

    # 2. Killed during preprocessing.
    during_preprocess = Run(config, ws, _env(tmp_path, api))
    during_preprocess.wait_for_line("Task run 'preprocess-tensor-chunk")
    during_preprocess.kill()
    assert not list((ws / "models").glob("*/last.pt"))

    # 3. Killed during training, after the first epoch's checkpoint.
    during_training = Run(config, ws, _env(tmp_path, api))
    during_training.wait_for(lambda: any((ws / "models").glob("*/last.pt")), "epoch checkpoint")
    during_training.kill()
    assert _last_epoch(ws) < EPOCHS, "killed while training still had epochs to go"

    # 4. Run again: it continues, and ends where the uninterrupted run ended.
    output = Run(config, ws, _env(tmp_path, api)).finish()
    assert "taking over the workspace lock" in output or "left by" in output, output[-3000:]
    pd.testing.assert_frame_equal(_catalog(ws), _catalog(tmp_path / "reference"))
    weights, history = _weights(ws)
    reference_weights, reference_history = _weights(tmp_path / "reference")
    assert [row["val_loss"] for row in history] == [row["val_loss"] for row in reference_history]
    assert weights.keys() == reference_weights.keys()
    for name, tensor in weights.items():
        assert torch.equal(tensor, reference_weights[name]), f"{name} differs from the uninterrupted run"

    # The three killed runs' MLflow runs were left RUNNING; the runs after them marked them KILLED.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runs = [run_summary(uri, run["run_id"]) for run in recent_runs(uri, "aidetect", limit=10)]
    statuses = sorted(run["status"] for run in runs if run["tags"][WORKSPACE_TAG] == str(ws))
    assert statuses == ["FINISHED", "KILLED", "KILLED", "KILLED"], statuses
