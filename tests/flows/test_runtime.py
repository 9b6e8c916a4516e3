"""What a command runs its flows on (flows.runtime): the temporary Prefect server it starts keeps every task run's
final state, stops with the command, and the command itself imports neither the server's code nor, before a
stage needs them, the model libraries."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flows.server import is_up
from tests.network_guard import guarded_environment

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
DEADLINE_S = 900  # generous: the server's start takes minutes on a busy 2-core machine

# A flow of two tasks on a temporary server started by prefect_session (no PREFECT_API_URL, no kept-up server).
RUN_FLOW = """
import json, os, sys
from prefect import flow, task
from flows.runtime import prefect_session

@task
def double(x):
    return 2 * x

@flow(name="runtime-probe")
def probe():
    return double(1) + double(2)

with prefect_session(limit_s=600) as api:
    state = probe(return_state=True)
    seen = os.environ.get("PREFECT_API_URL")
print(json.dumps({"api": api, "env": seen, "flow_run": str(state.state_details.flow_run_id), "result": state.result(),
                  "server_code_imported": "prefect.server.api.server" in sys.modules}))
"""

# Another command on the same PREFECT_HOME: its own temporary server reads what the first one stored.
READ_RUN = """
import asyncio, json, sys
from uuid import UUID
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from flows.runtime import prefect_session

async def states(flow_run_id):
    async with get_client() as client:
        flow_run = await client.read_flow_run(flow_run_id)
        runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        return flow_run.state_type.value, sorted(run.state_type.value for run in runs)

with prefect_session(limit_s=600):
    flow_state, task_states = asyncio.run(states(UUID(sys.argv[1])))
print(json.dumps({"flow": flow_state, "tasks": task_states}))
"""

IMPORTED = """
import sys
import flows.cli, flows.pipeline, flows.runtime, tasks.track
heavy = ("torch", "torchvision", "sklearn", "matplotlib", "pytorch_grad_cam", "prefect.server.api.server")
print(",".join(name for name in heavy if name in sys.modules))
"""


def _python(code: str, env: dict[str, str], *args: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=DEADLINE_S
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_temporary_server_keeps_every_task_state_and_stops_with_its_command(tmp_path: Path) -> None:
    env, _ = guarded_environment(tmp_path / "guard")
    env = {k: v for k, v in env.items() if k != "PREFECT_API_URL"} | {"PREFECT_HOME": str(tmp_path / "home")}
    ran = _python(RUN_FLOW, env)
    assert ran["result"] == 6 and ran["env"] == ran["api"], ran  # child processes would reach the same server
    assert not ran["server_code_imported"], "the command imports the server's code: the server's process runs it"
    assert not is_up(ran["api"]), "the temporary server outlived its command"
    read = _python(READ_RUN, env, ran["flow_run"])
    assert read == {"flow": "COMPLETED", "tasks": ["COMPLETED", "COMPLETED"]}, "states sent after the flow were lost"


def test_the_flows_import_no_model_library(tmp_path: Path) -> None:
    # A run whose model stages are cached never needs torch, scikit-learn or matplotlib: the stages import them.
    done = subprocess.run([sys.executable, "-c", IMPORTED], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "", f"imported with the flows: {done.stdout.strip()}"
