"""prefect.yaml: every deployment loads, and `prefect deploy --all` + a process worker run one for real."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from prefect import Flow
from prefect.client.schemas.schedules import CronSchedule

from flows.deployments import entrypoint_flow, read_deployments, runner_deployments
from tests.conftest import make_image
from tests.flows import team_servers

ROOT = Path(__file__).resolve().parents[2]


def test_every_deployment_points_at_a_flow_that_accepts_its_parameters():
    deployments = read_deployments()
    assert {d["name"] for d in deployments} == {"recrawl-and-retrain", "retrain", "crawl"}
    for deployment in deployments:
        flow = entrypoint_flow(deployment["entrypoint"])
        assert isinstance(flow, Flow), deployment["name"]
        flow.validate_parameters(deployment["parameters"])
        assert (ROOT / deployment["parameters"]["config_path"]).is_file()
        for schedule in deployment["schedules"]:
            CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])
        assert deployment["work_pool"]["name"] == "aidetect"
    served = runner_deployments("/tmp/my.yaml")
    assert [d.name for d in served] == [d["name"] for d in deployments]
    assert all(d.parameters["config_path"] == "/tmp/my.yaml" for d in served)


@pytest.fixture
def prefect_server(tmp_path: Path):
    """A real Prefect server on loopback with its own SQLite database; stopped at the end of the test."""
    with team_servers.prefect_server(tmp_path, f"sqlite+aiosqlite:///{tmp_path / 'prefect.db'}") as env:
        yield {**env, "PWD": str(ROOT)}


def _prefect(env: dict[str, str], *args: str, timeout: float = 240) -> str:
    return team_servers.prefect_cli(env, *args, cwd=ROOT, timeout=timeout)


@pytest.mark.slow
def test_deploy_all_and_a_process_worker_runs_the_crawl_deployment(prefect_server, tmp_path: Path):
    images = tmp_path / "ai"
    for index in range(3):
        make_image(images / "prompt-1" / f"{index}.png", seed=index, size=(64, 64), fmt="PNG")
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "sources": {"folders": [{"path": str(images), "label": "ai"}]},
                "execution": {"workspace": str(tmp_path / "ws")},
            }
        ),
        encoding="utf-8",
    )
    _prefect(prefect_server, "work-pool", "create", "aidetect", "--type", "process")
    _prefect(prefect_server, "deploy", "--all")
    listed = _prefect(prefect_server, "deployment", "ls")
    for name in ("recrawl-and-retrain", "retrain", "crawl"):
        assert name in listed
    _prefect(prefect_server, "deployment", "run", "aidetect-scheduled-crawl/crawl", "--param", f"config_path={config}")
    _prefect(prefect_server, "worker", "start", "--pool", "aidetect", "--run-once", timeout=300)
    runs = _prefect(prefect_server, "flow-run", "ls", "--state", "COMPLETED")
    assert "aidetect-scheduled-crawl" in runs, runs
    assert list((tmp_path / "ws" / "catalog").glob("ingest-*.parquet")), "the deployment's run produced no catalog"
