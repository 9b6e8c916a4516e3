"""The team setup of deploy/ for real, on loopback, started with deploy/README.md's plain commands: PostgreSQL under an
MLflow tracking server (artifacts uploaded through it) and a Prefect server, a process work pool and worker, a Dask
scheduler with worker processes. One deployment run of the whole pipeline, read back through the servers' REST APIs."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, ExitStack
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app
from pipeline_lib.core.config_loader import merge_mappings, read_yaml_mapping
from pipeline_lib.ops import demo_data
from tests.flows.mlflow_server import get_json, mlflow_server, post_json
from tests.flows.team_servers import (
    chunk_tasks_on,
    dask_cluster,
    postgres,
    prefect_cli,
    prefect_server,
    require_postgres,
)

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
STAGES = {"crawl", "ingest", "fingerprint", "dedup", "review", "split", "preprocess", "train", "evaluate", "report"}
FAST = {
    "train": {"epochs": 2, "head_only_epochs": 1, "image_size": 32, "weights": "none"},
    "evaluate": {"bootstrap": 50},
    "report": {"images_per_cell": 2},
}


def _start_together(stack: ExitStack, servers: list[AbstractContextManager[Any]]) -> list[Any]:
    """Enter the servers' context managers at the same time (they start in seconds each); all are stopped by stack."""
    with ThreadPoolExecutor(len(servers)) as pool:
        started = [pool.submit(server.__enter__) for server in servers]
    for server, future in zip(servers, started, strict=True):
        if future.exception() is None:
            stack.push(server)
    return [future.result() for future in started]


def _team_config(tmp_path: Path, dataset: demo_data.DemoDataset, mlflow: str, dask: str) -> Path:
    """deploy/team.yaml pointed at these servers, with the demo's small recipe and the demo data as folders."""
    team, demo = read_yaml_mapping(ROOT / "deploy" / "team.yaml"), read_yaml_mapping(ROOT / "configs" / "demo.yaml")
    data = merge_mappings(team, demo)
    folders = [
        {"path": str(dataset.site_dir), "label": "real", "group_by": "folder"},
        {"path": str(dataset.ai_dir), "label": "ai", "group_by": "folder", "generator": "synthetic"},
    ]
    local = {
        "sources": {"search": [], "folders": folders},
        "tracking": {"uri": mlflow, "system_metrics_interval_s": 0},
        "execution": {"workspace": str(tmp_path / "ws"), "dask_address": dask, "chunk_size": 8},
    }
    path = tmp_path / "team.yaml"
    path.write_text(yaml.safe_dump(merge_mappings(merge_mappings(data, FAST), local)), encoding="utf-8")
    return path


def _flow_run(api: str, flow_run_id: str) -> tuple[dict[str, Any], list[str]]:
    """The flow run (Prefect REST API) and its log lines."""
    flow_run = get_json(api, f"/flow_runs/{flow_run_id}")
    logs = post_json(api, "/logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200})
    return flow_run, [f"{line['level']} {line['message']}" for line in logs]


def test_a_deployment_runs_the_pipeline_on_postgres_backed_servers_and_dask_workers(tmp_path: Path):
    require_postgres()
    dataset = demo_data.generate_demo_dataset(tmp_path / "data", n_persons_per_class=10, image_size=64, seed=3)
    with ExitStack() as stack:
        database = stack.enter_context(postgres(tmp_path, ("mlflow", "prefect")))
        prefect_db = database.replace("postgresql://", "postgresql+asyncpg://") + "/prefect"
        servers = [
            mlflow_server(f"{database}/mlflow", tmp_path / "mlflow-artifacts", proxy=True),
            prefect_server(tmp_path, prefect_db),
            dask_cluster(tmp_path, n_workers=2),
        ]
        mlflow, env, dask = _start_together(stack, servers)
        config = _team_config(tmp_path, dataset, mlflow, dask)
        env = {**env, "PWD": str(ROOT)}  # prefect.yaml's pull step: the flow runs from this checkout

        prefect_cli(env, "work-pool", "create", "aidetect", "--type", "process", cwd=ROOT)
        deployment = "recrawl-and-retrain"
        prefect_cli(env, "deploy", "--name", deployment, "--param", f"config_path={config}", cwd=ROOT)
        created = prefect_cli(env, "deployment", "run", f"aidetect-recrawl-and-retrain/{deployment}", cwd=ROOT)
        flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", created).group(1)
        prefect_cli(env, "worker", "start", "--pool", "aidetect", "--run-once", cwd=ROOT, timeout=720)

        flow_run, logs = _flow_run(env["PREFECT_API_URL"], flow_run_id)
        assert flow_run["state_type"] == "COMPLETED", "\n".join(logs[-40:])
        ran = chunk_tasks_on(dask)  # the deployment's run mapped its chunks on the cluster's 2 worker processes
        assert ran["worker_processes"] == 2 and all(ran[part] >= 2 for part in ("validate", "tensor")), ran
        assert ran["hash"] == 0, f"the validate chunks hashed every image: none left to hash ({ran})"
        run_id = _check_mlflow(mlflow, flow_run_id, dask)
        _check_link_artifact(env["PREFECT_API_URL"], flow_run_id, mlflow)
        _check_cli(config, mlflow, run_id)
    assert list((tmp_path / "mlflow-artifacts").rglob("index.html")), "the report was not stored by the MLflow server"
    assert not (tmp_path / "ws" / "mlartifacts").exists(), "artifacts were written into the workspace, not the server"


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
    assert params["train.model"] == "resnet18" and 0.0 <= metrics["test.accuracy"] <= 1.0
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


def _check_cli(config: Path, mlflow: str, run_id: str) -> None:
    """`aidetect status` lists the run from the tracking server; `aidetect ui` names that server's UI."""
    runner = CliRunner()
    status = runner.invoke(app, ["status", "--config", str(config), "--json"])
    assert status.exit_code == 0, status.output
    info = json.loads(status.stdout)
    assert info["tracking_uri"] == mlflow and [run["run_id"] for run in info["runs"]] == [run_id], info
    ui = runner.invoke(app, ["ui", "--config", str(config)])
    assert ui.exit_code == 0 and f"MLflow UI: {mlflow}" in ui.output, ui.output
