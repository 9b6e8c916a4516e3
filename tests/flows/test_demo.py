"""`aidetect demo` end to end, as a user starts it: its own temporary Prefect server, loopback crawl, training,
report, the console summary; every Python process under a guard that fails any non-loopback connection."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.network_guard import guarded_environment, read_log

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
SMALL = [
    "--persons", "6",
    "--set", "train.epochs=3",
    "--set", "train.image_size=32",
    "--set", "evaluate.bootstrap=50",
    "--set", "report.images_per_cell=1",
    "--set", "tracking.system_metrics_interval_s=0",
    "--set", "split.min_groups_per_label=1",  # 6 persons: one val or test group per label
]  # fmt: skip


def test_demo_runs_offline_and_says_what_matters(tmp_path: Path):
    env, log = guarded_environment(tmp_path / "guard")
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")  # no PREFECT_API_URL: the demo starts its own server
    workspace = tmp_path / "demo"
    command = [sys.executable, "-c", "from flows.cli import main; main()", "demo", "-w", str(workspace), *SMALL]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=3000, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]

    entries = read_log(log)
    assert not [entry for entry in entries if entry["kind"] == "remote"], entries
    spawned = [entry for entry in entries if entry["kind"] == "spawn"]
    servers = [entry for entry in spawned if "uvicorn" in entry["args"]]
    assert len(servers) == 1, spawned  # Prefect's temporary server, started once by aidetect
    assert servers[0]["telemetry"]["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false", servers
    pythons = [entry for entry in spawned if "python" in Path(entry["args"][0]).name]  # ldconfig, git: not ours
    assert pythons and all(entry["telemetry"]["MLFLOW_DISABLE_TELEMETRY"] == "true" for entry in pythons), pythons

    out, err = result.stdout, result.stderr
    assert "Pipeline done in" in out and "test accuracy" in out and "(95% CI" in out, out
    assert "champion is now version 1" in out and "SYNTHETIC" in out and "format-shortcut audit" in out, out
    assert "telemetry" not in err.lower(), err[-3000:]
    epochs = [line for line in err.splitlines() if "epoch " in line and "train loss" in line and "img/s" in line]
    assert len(epochs) >= 2 and "[head only]" in epochs[0] and "[all layers]" in epochs[1], err[-3000:]
    reports = list((workspace / "reports").glob("*/report-*/index.html"))
    assert len(reports) == 1 and 'id="warnings"' in reports[0].read_text(encoding="utf-8")
