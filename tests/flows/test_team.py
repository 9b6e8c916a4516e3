"""docs/team.md followed on loopback: the page's own code blocks, run in order in one bash session, start the MLflow and
Prefect servers on PostgreSQL, a Dask scheduler and workers, the Prefect worker (which creates the work pool),
register the deployments, run the whole pipeline with deploy/team-demo.yaml, show it with `aidetect`, and stop
everything. The test supplies only what
the page leaves to the reader: free ports and its own folders in the settings block, and PostgreSQL (its own cluster,
as an unprivileged user when the tests run as root, for the two blocks that install and stop Debian's). It reads
the run back through both servers' REST APIs, with every Python process under the network guard."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.flows import team_page
from tests.flows.mlflow_server import free_port, get_json, post_json
from tests.flows.team_servers import chunk_tasks_on, postgres, require_postgres
from tests.network_guard import guarded_environment, read_log

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
BLOCKS = [
    "install", "settings", "databases", "demo-data", "mlflow", "prefect", "dask", "wait",
    "worker", "deploy", "run", "status", "stop", "stop-postgres",
]  # fmt: skip
NEED_ROOT = {"install", "stop-postgres"}  # the test's own cluster stands in for Debian's service
GIVEN = ["TEAM_HOME", "DB_PASSWORD", "DB_ADDRESS", "MLFLOW_PORT", "PREFECT_PORT", "DASK_PORT", "DASK_DASHBOARD_PORT"]
KEPT = ["PATH", "MLFLOW_URL", "PREFECT_API_URL", "DASK_ADDRESS"]  # as the page has them (from the given ones)
KEPT += ["MLFLOW_DISABLE_TELEMETRY", "PREFECT_SERVER_ANALYTICS_ENABLED"]  # the guard: nothing else turns them off
SERVERS = ["mlflow", "prefect-server", "dask-scheduler", "dask-worker", "prefect-worker"]  # pid files in run/
STAGES = {"crawl", "ingest", "fingerprint", "dedup", "review", "split", "preprocess", "train", "evaluate", "report"}
SECONDS = {"run": 1500, "wait": 900}  # per block; others 600 (a busy machine: a hang guard, not a time limit)


def _settings(block: str, values: dict[str, str]) -> str:
    """The page's settings block with the test's values, from this checkout and its interpreter's folder."""
    assert sorted(team_page.exported_names(block)) == sorted(GIVEN + KEPT), block
    block = team_page.replace_once(block, "cd ~/aidetect ", f"cd {ROOT} ")
    venv = 'export PATH="$PWD/.venv/bin:$PATH"'
    block = team_page.replace_once(block, venv, f'export PATH="{Path(sys.executable).parent}:$PATH"')
    return team_page.with_values(block, values)


def _scripts(blocks: dict[str, str], values: dict[str, str], psql: str) -> dict[str, str]:
    """The blocks the test runs, in page order: the settings with its values, psql on its cluster's superuser."""
    assert list(blocks) == BLOCKS, f"docs/team.md's blocks changed: {list(blocks)}"
    scripts = {name: body for name, body in blocks.items() if name not in NEED_ROOT}
    scripts["settings"] = _settings(blocks["settings"], values)
    scripts["databases"] = team_page.replace_once(blocks["databases"], "sudo -u postgres psql ", f"{psql} ")
    assert not [name for name, body in scripts.items() if "sudo" in body], "a block the test runs needs root"
    return scripts


def test_docs_team_md_sets_up_the_servers_runs_the_demo_deployment_and_stops_everything(tmp_path: Path):
    bindir = require_postgres()
    env, guard_log = guarded_environment(tmp_path / "guard")  # no PREFECT_* and no telemetry settings of ours
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    env["PYTHONPATH"] = f"{tmp_path / 'guard'}:{ROOT}"  # this checkout in every process (servers, workers, flows)
    env["DASK_DISTRIBUTED__COMM__TIMEOUTS__TCP"] = "300s"  # the page's advice for a busy machine (CI's is)
    ports = {name: str(free_port()) for name in ("MLFLOW_PORT", "PREFECT_PORT", "DASK_PORT", "DASK_DASHBOARD_PORT")}
    team = tmp_path / "team"
    with postgres(tmp_path, (), superuser="postgres") as database:
        address = database.rsplit("@", 1)[1]
        values = {"TEAM_HOME": str(team), "DB_PASSWORD": "test-only", "DB_ADDRESS": address, **ports}
        psql = f"{bindir / 'psql'} -h 127.0.0.1 -p {address.split(':')[1]} -U postgres"
        _follow_the_page(_scripts(team_page.read_blocks(), values, psql), env, team, ports)
    remote = [entry for entry in read_log(guard_log) if entry["kind"] == "remote"]
    assert not remote, f"a process tried to connect off the machine: {remote}"
    assert list((team / "mlflow-artifacts").rglob("index.html")), "the report was not stored by the MLflow server"
    assert not (team / "workspace" / "mlartifacts").exists(), "artifacts were written into the workspace"


def _follow_the_page(scripts: dict[str, str], env: dict[str, str], team: Path, ports: dict[str, str]) -> None:
    """Every block up to the status one, the checks while the servers run, then the stop block: nothing is left
    running (after a failure, the processes the page started are stopped here instead)."""
    pids: dict[str, int] = {}
    try:
        with team_page.session(env, ROOT) as shell:
            out = {name: shell.run(name, scripts[name], SECONDS.get(name, 600)) for name in _until(scripts, "status")}
            pids.update(_pids(team))
            _check_run(out, ports, team)
            stop = shell.run("stop", scripts["stop"], 600)
            assert not list((team / "run").glob("*.pid")), f"the stop block left pid files:\n{stop}"
            left = team_page.alive_groups(pids)
            assert not left, f"still running after the stop block: {left}\n{stop}"
    except AssertionError as error:
        raise AssertionError(f"{error}\n{_log_tails(team / 'logs')}") from None
    finally:
        pids.update(_pids(team))
        team_page.stop_groups(pids)


def _log_tails(folder: Path, lines: int = 25) -> str:
    """The last lines of each server's log (the page sends them to $TEAM_HOME/logs/)."""
    tails = [
        f"--- {log.name}:\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
        for log in sorted(folder.glob("*.log"))
    ]
    return "\n".join(tails)


def _until(scripts: dict[str, str], last: str) -> list[str]:
    names = list(scripts)
    return names[: names.index(last) + 1]


def _pids(team: Path) -> dict[str, int]:
    return {path.stem: int(path.read_text()) for path in (team / "run").glob("*.pid")}


def _check_run(out: dict[str, str], ports: dict[str, str], team: Path) -> None:
    """What the run left on the servers, and what `aidetect status` and `aidetect ui` showed of it."""
    assert out["wait"].count("up: ") == 3, out["wait"]
    assert set(_pids(team)) == set(SERVERS), _pids(team)
    flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", out["run"]).group(1)
    mlflow, api = f"http://127.0.0.1:{ports['MLFLOW_PORT']}", f"http://127.0.0.1:{ports['PREFECT_PORT']}/api"
    dask = f"tcp://127.0.0.1:{ports['DASK_PORT']}"
    flow_run, logs = _flow_run(api, flow_run_id)
    assert flow_run["state_type"] == "COMPLETED", "\n".join(logs[-40:])
    assert {d["name"] for d in post_json(api, "/deployments/filter", {})} == {"recrawl-and-retrain", "retrain", "crawl"}
    ran = chunk_tasks_on(dask)  # the deployment's run mapped its chunks on the cluster's 2 worker processes
    assert ran["worker_processes"] == 2 and all(ran[part] >= 2 for part in ("validate", "tensor")), ran
    assert ran["hash"] == 0, f"the validate chunks hashed every image: none left to hash ({ran})"
    run_id = _check_mlflow(mlflow, flow_run_id, dask)
    _check_link_artifact(api, flow_run_id, mlflow)
    assert run_id[:8] in out["status"] and f"MLflow UI: {mlflow}" in out["status"], out["status"]


def _flow_run(api: str, flow_run_id: str) -> tuple[dict[str, Any], list[str]]:
    """The flow run (Prefect REST API) and its log lines."""
    flow_run = get_json(api, f"/flow_runs/{flow_run_id}")
    logs = post_json(api, "/logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200})
    return flow_run, [f"{line['level']} {line['message']}" for line in logs]


def _check_mlflow(base: str, flow_run_id: str, dask: str) -> str:
    """The pipeline run, its params, datasets, nested stage runs and the champion alias, through MLflow's REST API."""
    experiment = get_json(base, "/api/2.0/mlflow/experiments/get-by-name?experiment_name=aidetect")["experiment"]
    search = {"experiment_ids": [experiment["experiment_id"]], "filter": "tags.aidetect.kind = 'pipeline'"}
    (run,) = post_json(base, "/api/2.0/mlflow/runs/search", search)["runs"]
    run_id = run["info"]["run_id"]
    tags = {tag["key"]: tag["value"] for tag in run["data"]["tags"]}
    params = {param["key"]: param["value"] for param in run["data"]["params"]}
    metrics = {metric["key"]: metric["value"] for metric in run["data"]["metrics"]}
    assert run["info"]["status"] == "FINISHED" and tags["prefect.flow_run_id"] == flow_run_id
    assert tags["prefect.deployment_id"] and tags["aidetect.stage.train"] == "Completed", tags
    assert params["execution.task_runner"] == "dask" and params["execution.dask_address"] == dask, params
    assert params["train.model"] == "resnet18" and params["train.weights"] == "none", params
    assert params["review.mode"] == "auto" and 0.0 <= metrics["test.accuracy"] <= 1.0, params
    datasets = {item["dataset"]["name"]: item["dataset"]["digest"] for item in run["inputs"]["dataset_inputs"]}
    assert set(datasets) == {"catalog-train", "catalog-val", "catalog-test"} and all(datasets.values()), datasets

    nested = {"experiment_ids": [experiment["experiment_id"]], "filter": f"tags.mlflow.parentRunId = '{run_id}'"}
    children = post_json(base, "/api/2.0/mlflow/runs/search", nested)["runs"]
    assert {child["info"]["run_name"] for child in children} >= STAGES, children
    assert {child["info"]["status"] for child in children} == {"FINISHED"}

    alias = get_json(base, "/api/2.0/mlflow/registered-models/alias?name=aidetect&alias=champion")["model_version"]
    assert alias["run_id"] == run_id, alias
    report = get_json(base, f"/api/2.0/mlflow/artifacts/list?run_id={run_id}&path=report")
    assert any(item["path"].endswith("index.html") for item in report.get("files", [])), report
    return run_id


def _check_link_artifact(api: str, flow_run_id: str, mlflow: str) -> None:
    """The flow run's link artifact points at the run in the tracking server's own UI."""
    query = {"artifacts": {"key": {"any_": ["aidetect-mlflow-run"]}, "flow_run_id": {"any_": [flow_run_id]}}}
    (artifact,) = post_json(api, "/artifacts/filter", query)
    assert f"]({mlflow}/#/experiments/" in artifact["data"], artifact["data"]  # a markdown link
