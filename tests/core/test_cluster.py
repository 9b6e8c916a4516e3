"""pipeline_lib.core.cluster: a Dask cluster must show that its workers read and write the workspace before a run
uses it.

A worker that cannot see the workspace for real (its own mount namespace) is in tests/flows/test_dask.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from distributed import LocalCluster

from pipeline_lib.core.cluster import ClusterError, check_workers_see, probe_workspace
from tests.flows.mlflow_server import free_port

IN_PROCESS = {"processes": False, "protocol": "tcp", "host": "127.0.0.1", "dashboard_address": None}  # thread workers


def test_probe_reads_the_token_and_answers_next_to_it(tmp_path: Path):
    (tmp_path / "token").write_text("abc", encoding="utf-8")
    answer = probe_workspace(str(tmp_path), "abc")
    assert (tmp_path / answer["answer"]).read_text(encoding="utf-8") == "abc"


def test_probe_names_a_missing_or_different_folder(tmp_path: Path):
    missing = probe_workspace(str(tmp_path / "elsewhere"), "abc")
    assert "cannot read" in missing["error"] and "elsewhere" in missing["error"]
    (tmp_path / "token").write_text("another run", encoding="utf-8")
    assert "different folder" in probe_workspace(str(tmp_path), "abc")["error"]


def test_workers_that_see_the_workspace_pass_and_leave_nothing(tmp_path: Path):
    with LocalCluster(n_workers=2, **IN_PROCESS) as cluster:
        assert check_workers_see(cluster.scheduler_address, tmp_path) == 2
    assert list(tmp_path.iterdir()) == []


def test_no_scheduler_at_the_address_is_named(tmp_path: Path):
    address = f"tcp://127.0.0.1:{free_port()}"
    with pytest.raises(ClusterError, match="no Dask scheduler answers at " + address):
        check_workers_see(address, tmp_path, timeout_s=5)
    assert list(tmp_path.iterdir()) == []


def test_a_scheduler_without_workers_is_an_error_not_a_hang(tmp_path: Path):
    with LocalCluster(n_workers=0, **IN_PROCESS) as cluster:
        with pytest.raises(ClusterError, match="has no worker after 2 s: start `dask worker"):
            check_workers_see(cluster.scheduler_address, tmp_path, timeout_s=2)
