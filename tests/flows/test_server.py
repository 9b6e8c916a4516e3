"""`aidetect server start|status|stop` with a real Prefect server, and later commands using it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

from flows import server
from pipeline_lib.core.tracking.runs import run_summary
from tests.conftest import make_image

pytestmark = pytest.mark.slow
AIDETECT = str(Path(sys.executable).parent / "aidetect")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _aidetect(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([AIDETECT, *args], env=env, capture_output=True, text=True, timeout=600, check=False)


def _flow_runs(api_url: str) -> list[dict]:
    request = urllib.request.Request(
        f"{api_url}/flow_runs/filter", data=b"{}", headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_a_started_server_is_used_by_later_commands_until_it_is_stopped(tmp_path: Path) -> None:
    home = tmp_path / "prefect-home"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {"PREFECT_HOME": str(home)}
    folder = tmp_path / "ai"
    for index in range(2):
        make_image(folder / "prompt-a" / f"v{index}.png", seed=index, size=(64, 64), fmt="PNG")
    config = tmp_path / "config.yaml"
    config.write_text(f"sources:\n  folders:\n    - path: {folder}\n      label: ai\n", encoding="utf-8")
    port = _free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    try:
        started = _aidetect(env, "server", "start", "--port", str(port), "--timeout", "550")
        assert started.returncode == 0, started.stdout + started.stderr
        assert f"Prefect server started: {api_url}" in started.stdout
        again = _aidetect(env, "server", "start", "--port", str(port))
        assert again.returncode == 0 and "already running" in again.stdout
        assert f"Prefect API: {api_url}" in _aidetect(env, "server", "status").stdout

        crawled = _aidetect(env, "crawl", "--config", str(config), "--workspace", str(tmp_path / "ws"), "--json")
        assert crawled.returncode == 0, crawled.stdout + crawled.stderr
        summary = json.loads(crawled.stdout[crawled.stdout.index("{") : crawled.stdout.rindex("}") + 1])
        assert summary["states"] == {"crawl": "Completed", "ingest": "Completed"}, summary
        uri = f"sqlite:///{tmp_path / 'ws' / 'mlflow.db'}"
        flow_run_id = run_summary(uri, summary["mlflow_run_id"])["tags"]["prefect.flow_run_id"]
        runs = _flow_runs(api_url)
        assert [(run["id"], run["state_type"]) for run in runs] == [(flow_run_id, "COMPLETED")], "run on this server"

        # in-process (whatever API this test session uses): the same choice, and PREFECT_API_URL first
        with temporary_settings({PREFECT_HOME: str(home)}, restore_defaults={PREFECT_API_URL}):
            with server.prefect_api() as chosen:
                assert chosen == api_url
            with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}), server.prefect_api() as chosen:
                assert chosen == "http://127.0.0.1:9/api"
    finally:
        stopped = _aidetect(env, "server", "stop")
    assert stopped.returncode == 0 and f"stopped {api_url}" in stopped.stdout, stopped.stdout + stopped.stderr
    assert not server.is_up(api_url) and not server.record_path(home).exists()
