"""Telemetry defaults: set only where the user made no choice."""

from __future__ import annotations

from pipeline_lib.core import privacy


def test_mlflow_telemetry_off_unless_the_user_chose():
    env: dict[str, str] = {}
    assert privacy.quiet_mlflow(env) and env == {"MLFLOW_DISABLE_TELEMETRY": "true"}
    chose = {"MLFLOW_DISABLE_TELEMETRY": "false"}
    assert not privacy.quiet_mlflow(chose) and chose == {"MLFLOW_DISABLE_TELEMETRY": "false"}
    tracked = {"DO_NOT_TRACK": "false"}
    assert not privacy.quiet_mlflow(tracked) and "MLFLOW_DISABLE_TELEMETRY" not in tracked


def test_prefect_server_analytics_off_unless_the_user_chose():
    env: dict[str, str] = {}
    assert privacy.quiet_prefect_server(env) and env == {"PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    chose = {"PREFECT_SERVER_ANALYTICS_ENABLED": "true"}
    assert not privacy.quiet_prefect_server(chose) and chose["PREFECT_SERVER_ANALYTICS_ENABLED"] == "true"
