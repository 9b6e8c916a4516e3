"""Nothing leaves the machine unless the user asks: telemetry off by default in what aidetect starts.

Only environment defaults, set where a user has made no choice of their own; no imports of the tools themselves,
so this runs before MLflow is first imported (MLflow starts its telemetry client at import time).
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

# MLflow 3.x reads MLFLOW_DISABLE_TELEMETRY (and DO_NOT_TRACK) when it is imported and in its UI server.
MLFLOW_TELEMETRY = "MLFLOW_DISABLE_TELEMETRY"
DO_NOT_TRACK = "DO_NOT_TRACK"
# Prefect's server runs a telemetry service ("send_telemetry_heartbeat") unless this setting is false.
PREFECT_ANALYTICS = "PREFECT_SERVER_ANALYTICS_ENABLED"


def quiet_mlflow(environ: MutableMapping[str, str] | None = None) -> bool:
    """Turn MLflow's telemetry off unless the user chose (MLFLOW_DISABLE_TELEMETRY or DO_NOT_TRACK set); True if set."""
    env = os.environ if environ is None else environ
    if MLFLOW_TELEMETRY in env or DO_NOT_TRACK in env:
        return False
    env[MLFLOW_TELEMETRY] = "true"
    return True


def quiet_prefect_server(environ: MutableMapping[str, str] | None = None) -> bool:
    """Turn the analytics of a Prefect server aidetect starts off unless PREFECT_SERVER_ANALYTICS_ENABLED is set.

    A Prefect profile's own value still wins: Prefect passes the settings a user set explicitly to the server
    process after the environment.
    """
    env = os.environ if environ is None else environ
    if PREFECT_ANALYTICS in env:
        return False
    env[PREFECT_ANALYTICS] = "false"
    return True
