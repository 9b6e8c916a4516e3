"""One Prefect test harness (temporary server + database in tmp) for every flow test; its server sends nothing out."""

from __future__ import annotations

import pytest
from prefect.settings import PREFECT_HOME, PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings
from prefect.testing.utilities import prefect_test_harness


@pytest.fixture(scope="session")
def harness(tmp_path_factory: pytest.TempPathFactory):
    settings = {PREFECT_HOME: str(tmp_path_factory.mktemp("prefect-home")), PREFECT_SERVER_ANALYTICS_ENABLED: False}
    with temporary_settings(settings):
        # a generous limit: on a machine with load 8 on 2 cores the server's first answer can take minutes; pytest's
        # 1800 s per test (which counts this setup) still ends a server that never answers
        with prefect_test_harness(server_startup_timeout=480):
            yield
