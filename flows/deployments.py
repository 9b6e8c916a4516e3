"""Entry points for scheduled deployments (prefect.yaml, `aidetect serve`): they take a config path, so a schedule
needs no Python, and the schedules themselves live in one place: prefect.yaml."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from prefect import Flow, flow

from flows.pipeline import crawl_flow, pipeline_in_current_flow
from pipeline_lib.core.config_loader import load_config

PREFECT_YAML = Path(__file__).resolve().parents[1] / "prefect.yaml"


@flow(name="aidetect-recrawl-and-retrain")
def recrawl_and_retrain(
    config_path: str = "configs/default.yaml", overrides: list[str] | None = None
) -> dict[str, Any]:
    """The whole pipeline: crawl new images, then every later stage whose inputs changed.

    The stages run in this flow run itself (not a subflow), so that the review gate can suspend the deployment run.
    """
    return pipeline_in_current_flow(load_config(config_path, overrides or []))


@flow(name="aidetect-retrain")
def retrain(config_path: str = "configs/default.yaml", overrides: list[str] | None = None) -> dict[str, Any]:
    """Train and evaluate from the current catalog: no crawling; the crawl log as it stands feeds ingest."""
    return pipeline_in_current_flow(load_config(config_path, [*(overrides or []), "execution.crawl=false"]))


@flow(name="aidetect-scheduled-crawl")
def recrawl(config_path: str = "configs/default.yaml", overrides: list[str] | None = None) -> dict[str, Any]:
    """Crawl and ingest only. Every run crawls: keywords searched more than sources.recrawl_after_hours ago (20 h by
    default, so every day on the daily schedule) are searched again; URLs already fetched are skipped."""
    return crawl_flow(load_config(config_path, overrides or []))


def read_deployments(path: Path = PREFECT_YAML) -> list[dict[str, Any]]:
    """The deployments declared in prefect.yaml."""
    return list(yaml.safe_load(path.read_text(encoding="utf-8"))["deployments"])


def entrypoint_flow(entrypoint: str) -> Flow[..., Any]:
    """The flow object an entrypoint such as flows/deployments.py:retrain names (only this module's flows)."""
    module_path, name = entrypoint.split(":")
    if Path(module_path).name != Path(__file__).name:
        raise ValueError(f"entrypoint {entrypoint!r} must point into flows/deployments.py")
    flows = {"recrawl_and_retrain": recrawl_and_retrain, "retrain": retrain, "recrawl": recrawl}
    if name not in flows:
        raise ValueError(f"entrypoint {entrypoint!r}: no flow {name!r}; known: {', '.join(flows)}")
    return flows[name]


def runner_deployments(config_path: str | None = None, path: Path = PREFECT_YAML) -> list[Any]:
    """prefect.yaml's deployments as RunnerDeployments for `prefect.serve` (same names, schedules, parameters)."""
    deployments = []
    for spec in read_deployments(path):
        parameters = dict(spec.get("parameters", {}))
        if config_path is not None:
            parameters["config_path"] = config_path
        crons = [schedule["cron"] for schedule in spec.get("schedules", []) if schedule.get("active", True)]
        deployments.append(
            entrypoint_flow(spec["entrypoint"]).to_deployment(
                name=spec["name"], cron=crons or None, parameters=parameters, description=spec.get("description")
            )
        )
    return deployments
