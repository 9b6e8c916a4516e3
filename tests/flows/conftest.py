"""One Prefect test harness (temporary server + database in tmp) for every flow test."""

from __future__ import annotations

import pytest
from prefect.settings import PREFECT_HOME, temporary_settings
from prefect.testing.utilities import prefect_test_harness


@pytest.fixture(scope="session")
def harness(tmp_path_factory: pytest.TempPathFactory):
    with temporary_settings({PREFECT_HOME: str(tmp_path_factory.mktemp("prefect-home"))}):
        with prefect_test_harness(server_startup_timeout=120):
            yield
