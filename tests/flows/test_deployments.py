"""prefect.yaml names real flows with parameters they accept, and valid schedules."""

from __future__ import annotations

import importlib
from pathlib import Path

import yaml
from prefect import Flow
from prefect.client.schemas.schedules import CronSchedule

ROOT = Path(__file__).resolve().parents[2]


def test_every_deployment_points_at_a_flow_that_accepts_its_parameters():
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text(encoding="utf-8"))
    assert len(spec["deployments"]) >= 2
    for deployment in spec["deployments"]:
        module_path, name = deployment["entrypoint"].split(":")
        module = importlib.import_module(module_path.removesuffix(".py").replace("/", "."))
        flow = getattr(module, name)
        assert isinstance(flow, Flow), deployment["name"]
        flow.validate_parameters(deployment["parameters"])
        assert (ROOT / deployment["parameters"]["config_path"]).is_file()
        for schedule in deployment["schedules"]:
            CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])
