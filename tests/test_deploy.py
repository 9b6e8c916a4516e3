"""deploy/: the compose file's structure and its agreement with prefect.yaml, team.yaml and what aidetect is tested
with. (No container engine here: the compose file is checked, not run; tests/flows/test_team.py runs the same
servers with plain commands.)"""

from __future__ import annotations

import re
from importlib.metadata import version
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from flows.deployments import read_deployments
from pipeline_lib.core.config import flatten_config
from pipeline_lib.core.config_loader import load_config

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
TEAM_KEYS = {"tracking.uri", "execution.workspace", "execution.task_runner", "execution.dask_address"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text(encoding="utf-8"))


def test_every_service_has_an_image_and_waits_for_healthy_dependencies(compose: dict):
    services = compose["services"]
    assert set(services) == {
        "postgres", "mlflow", "prefect-server", "dask-scheduler", "dask-worker", "deployments", "prefect-worker"
    }
    for name, service in services.items():
        assert service.get("image"), name
        for dependency, condition in service.get("depends_on", {}).items():
            assert dependency in services, (name, dependency)
            wanted = "service_completed_successfully" if dependency == "deployments" else "service_healthy"
            assert condition == {"condition": wanted}, (name, dependency, condition)
            assert wanted != "service_healthy" or "healthcheck" in services[dependency], dependency
    for name in ("postgres", "mlflow", "prefect-server", "dask-scheduler"):
        assert services[name]["healthcheck"]["test"][0] == "CMD", name


def test_volumes_are_declared_and_mounted_files_exist(compose: dict):
    for name, service in compose["services"].items():
        for mount in service.get("volumes", []):
            source, target = mount.split(":")[:2]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), (name, source)
            else:
                assert source in compose["volumes"], (name, source)
            assert target.startswith("/"), (name, target)


def test_the_images_match_what_aidetect_is_tested_with(compose: dict):
    services = compose["services"]
    assert services["postgres"]["image"].startswith("postgres:")
    prefect_image = services["prefect-server"]["image"]
    assert prefect_image == f"prefecthq/prefect:{version('prefect')}-python3.11", prefect_image
    dockerfile = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    assert "FROM python:3.11-" in dockerfile and 'pip install -e ".[team]"' in dockerfile
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert re.search(r"^team = \[", pyproject, re.MULTILINE), "pyproject.toml has no `team` extra"
    copied = set(re.findall(r"^COPY (\S+) ", dockerfile, re.MULTILINE)) | {"README.md", "prefect.yaml"}
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text(encoding="utf-8")
    for path in copied:
        assert f"!{path}" in ignore or f"!{path}/" in ignore, path
        assert (ROOT / path).exists(), path


def test_the_deployments_service_registers_prefect_yaml_with_team_yaml(compose: dict):
    services = compose["services"]
    script = services["deployments"]["command"][0]
    names = re.search(r"for name in ([\w\- ]+); do", script).group(1).split()
    deployments = read_deployments()
    assert names == [d["name"] for d in deployments]
    pools = {d["work_pool"]["name"] for d in deployments}
    assert pools == {"aidetect"} and "work-pool create aidetect --type process" in script
    assert "--param config_path=/srv/aidetect/team.yaml" in script
    assert services["prefect-worker"]["command"][:5] == ["prefect", "worker", "start", "--pool", "aidetect"]
    assert "./team.yaml:/srv/aidetect/team.yaml:ro" in services["prefect-worker"]["volumes"]


def test_team_yaml_is_the_default_recipe_on_the_compose_servers(compose: dict):
    team, default = load_config(DEPLOY / "team.yaml"), load_config(ROOT / "configs" / "default.yaml")
    team_flat, default_flat = flatten_config(team), flatten_config(default)
    differ = {k for k in team_flat.keys() | default_flat.keys() if str(team_flat.get(k)) != str(default_flat.get(k))}
    source_paths = {"sources.search", "sources.folders"}  # the same files, relative to team.yaml
    assert differ - source_paths <= TEAM_KEYS, f"deploy/team.yaml must follow configs/default.yaml: {differ}"
    assert [s.keywords_file.name for s in team.sources.search] == [s.keywords_file.name for s in default.sources.search]
    assert [f.path.name for f in team.sources.folders] == [f.path.name for f in default.sources.folders]

    services = compose["services"]
    tracking = urlparse(team.tracking.uri)
    assert tracking.hostname == "mlflow" and f"--port {tracking.port}" in " ".join(services["mlflow"]["command"])
    scheduler = urlparse(team.execution.dask_address)
    assert team.execution.task_runner == "dask" and scheduler.hostname == "dask-scheduler"
    assert f"--port {scheduler.port}" in " ".join(services["dask-scheduler"]["command"])
    assert f"tcp://dask-scheduler:{scheduler.port}" in services["dask-worker"]["command"]
    for name in ("dask-worker", "prefect-worker"):  # one shared workspace, at the path team.yaml names
        assert f"workspace:{team.execution.workspace}" in services[name]["volumes"], name


def test_team_demo_yaml_runs_offline_and_docs_team_md_can_point_it_at_any_servers():
    demo = load_config(DEPLOY / "team-demo.yaml")
    assert not demo.sources.search and not demo.sources.urls, "the demo config must not search or fetch URLs"
    assert [f.path.relative_to(DEPLOY).as_posix() for f in demo.sources.folders] == ["demo-data/site", "demo-data/ai"]
    assert demo.train.weights == "none" and demo.review.mode == "auto", (demo.train.weights, demo.review.mode)
    assert demo.execution.task_runner == "dask"
    text = (DEPLOY / "team-demo.yaml").read_text(encoding="utf-8")
    page = (ROOT / "docs" / "team.md").read_text(encoding="utf-8")
    for address in ("http://127.0.0.1:5000", "tcp://127.0.0.1:8786", "/srv/aidetect"):  # what the page's sed replaces
        assert f"s|{address}|" in page, address
        assert sum(address in line.split("#")[0] for line in text.splitlines()) == 1, address
