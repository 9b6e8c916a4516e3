"""The mapped ingest, fingerprint and preprocess stages give the same catalog and tensors on threads, on a process
pool and on a Dask cluster of `dask scheduler` + `dask worker` processes (loopback); a cluster whose workers cannot
see the workspace stops a run before its first stage."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from prefect import flow
from typer.testing import CliRunner

from flows.cli import app
from flows.pipeline import _crawl_and_ingest, fingerprint_stage, make_task_runner, preprocess_stage, tracked_stages
from pipeline_lib.acquire import fingerprint as fingerprint_lib
from pipeline_lib.core.catalog import STATUS_OK, read_snapshot, write_snapshot
from pipeline_lib.core.config import ExecutionConfig, PipelineConfig
from pipeline_lib.core.config_loader import build_config
from pipeline_lib.core.tracking.stage_runs import stage_runs
from pipeline_lib.core.workspace import Ref, Workspace
from pipeline_lib.learn import preprocess as preprocess_lib
from tests.conftest import make_image
from tests.flows.team_servers import chunk_tasks_on, dask_cluster

HASH_COLUMNS = ["sha256", "path", "status", "phash", "dhash"]
INGEST_COLUMNS = ["sha256", "path", "status", "width", "height", "format", "mode", "n_bytes", "label", "group"]
IMAGE_SIZE = 24


@flow(name="aidetect-fingerprint-test")
def fingerprint_flow(config: PipelineConfig) -> dict[str, Any]:
    """The pipeline's crawl (folders) -> ingest -> fingerprint stages, through the pipeline's own functions."""
    with tracked_stages(config, "fingerprint-test", {"aidetect.kind": "test"}) as (workspace, run, tracker):
        _, ingested = _crawl_and_ingest(config, workspace, run)
        started = time.perf_counter()
        state = fingerprint_stage(workspace, False, ingested.catalog, config.dedup, config.execution.chunk_size)
        hashed = run.record("fingerprint", state, time.perf_counter() - started)
        split_ref = _all_train(workspace, hashed.catalog)
        started = time.perf_counter()
        size, chunk_size = config.train.image_size, config.execution.chunk_size
        state = preprocess_stage(workspace, False, split_ref, size, config.preprocess.normalize, chunk_size)
        run.record("preprocess", state, time.perf_counter() - started)
    return {"states": run.states, "ingest": ingested.catalog, "catalog": hashed.catalog, "tracker": tracker}


def _all_train(workspace: Workspace, catalog: Ref) -> Ref:
    """The catalog with every ok row in the train split (what preprocess needs; the split stage is not under test)."""
    table = read_snapshot(workspace, catalog)
    table.loc[table["status"] == STATUS_OK, "split"] = "train"
    return write_snapshot(workspace, "split", table)


def _images(data: Path) -> None:
    """Twelve distinct images in four groups, one exact duplicate, one PNG; 3-image chunks make several chunks."""
    for label in ("real", "ai"):
        for index in range(6):
            fmt = "PNG" if index == 5 else "JPEG"
            seed = index * 31 + (0 if label == "real" else 1000)
            make_image(data / label / f"g{index % 2}" / f"{index}.{fmt.lower()}", seed=seed, size=(72, 64), fmt=fmt)
    shutil.copy(data / "real" / "g0" / "0.jpeg", data / "real" / "g1" / "copy.jpeg")


def _config(data: Path, root: Path, execution: dict[str, Any]) -> PipelineConfig:
    folders = [{"path": str(data / label), "label": label} for label in ("real", "ai")]
    mapping = {
        "sources": {"folders": folders},
        "execution": {"workspace": str(root), "chunk_size": 3, **execution},
        "train": {"image_size": IMAGE_SIZE},
        "tracking": {"uri": f"sqlite:///{root.parent / 'mlflow.db'}"},
    }
    return build_config(mapping, origin="test")


def _run(config: PipelineConfig) -> dict[str, Any]:
    """The flow as a deployment would start it (default runner): the stages map on config.execution's runner."""
    return fingerprint_flow(config)


def _hashes(result: dict[str, Any], root: Path) -> pd.DataFrame:
    table = read_snapshot(Workspace.open(root), result["catalog"])
    return table[HASH_COLUMNS].sort_values(["sha256", "path"]).reset_index(drop=True)


def _ingested(result: dict[str, Any], root: Path) -> pd.DataFrame:
    table = read_snapshot(Workspace.open(root), result["ingest"])
    return table[INGEST_COLUMNS].sort_values(["sha256", "path"]).reset_index(drop=True)


def _tensors(root: Path, shas: list[str]) -> dict[str, np.ndarray]:
    workspace = Workspace.open(root)
    return {sha: np.load(preprocess_lib.tensor_path(workspace, sha, IMAGE_SIZE)) for sha in shas}


def test_per_image_stages_on_processes_and_a_dask_cluster_equal_threads(harness, tmp_path: Path):
    data = tmp_path / "data"
    _images(data)
    threads = _run(_config(data, tmp_path / "threads", {"task_runner": "threads", "max_workers": 2}))
    expected = _hashes(threads, tmp_path / "threads")
    ok = expected[expected["status"] == STATUS_OK]
    assert len(ok) == 13 and ok["sha256"].nunique() == 12
    assert (ok["phash"].str.len() == 16).all() and (ok["dhash"].str.len() == 16).all()
    for row in ok.itertuples():  # the mapped chunks hash exactly like the pure function
        assert (row.phash, row.dhash) == fingerprint_lib.hash_pair(tmp_path / "threads" / row.path)

    processes = _run(_config(data, tmp_path / "processes", {"task_runner": "processes", "max_workers": 2}))
    pd.testing.assert_frame_equal(_hashes(processes, tmp_path / "processes"), expected)
    pd.testing.assert_frame_equal(
        _ingested(processes, tmp_path / "processes"), _ingested(threads, tmp_path / "threads")
    )

    with dask_cluster(tmp_path, n_workers=2) as address:
        dask_config = _config(data, tmp_path / "dask", {"task_runner": "dask", "dask_address": address})
        on_dask = _run(dask_config)
        ran = chunk_tasks_on(address)  # 12 distinct images in chunks of 3 ran on the 2 worker processes
        assert ran["worker_processes"] == 2 and all(ran[part] >= 4 for part in ("validate", "tensor")), ran
        assert ran["hash"] == 0, f"the validate chunks hashed every image: none left to hash ({ran})"
        again = _run(dask_config)

    pd.testing.assert_frame_equal(_hashes(on_dask, tmp_path / "dask"), expected)
    pd.testing.assert_frame_equal(_ingested(on_dask, tmp_path / "dask"), _ingested(threads, tmp_path / "threads"))
    shas = sorted(ok["sha256"].unique())
    thread_tensors, dask_tensors = _tensors(tmp_path / "threads", shas), _tensors(tmp_path / "dask", shas)
    for sha in shas:
        assert dask_tensors[sha].shape == (3, IMAGE_SIZE, IMAGE_SIZE) and dask_tensors[sha].dtype == np.uint8
        np.testing.assert_array_equal(dask_tensors[sha], thread_tensors[sha])
        stored = preprocess_lib.find_original(Workspace.open(tmp_path / "dask"), sha)
        np.testing.assert_array_equal(dask_tensors[sha], preprocess_lib.decode_image(stored, IMAGE_SIZE))
    assert not list((tmp_path / "dask" / "incoming").rglob("*.*"))  # every crawled file was moved by the merge
    assert on_dask["states"]["fingerprint"] == "Completed"
    cached = dict.fromkeys(("ingest", "fingerprint", "preprocess"), "Cached")
    assert again["states"] == {"crawl": "Completed"} | cached, again["states"]  # the crawl always runs, finds nothing
    assert again["catalog"] == on_dask["catalog"]
    stages = stage_runs(on_dask["tracker"])
    assert set(stages) == {"crawl", "ingest", "fingerprint", "preprocess"}, stages
    assert stages["fingerprint"]["metrics"]["fingerprint.hashed"] == 0  # ingest's decode hashed them
    assert stages["fingerprint"]["metrics"]["fingerprint.cached"] == 12
    assert stages["preprocess"]["metrics"]["preprocess.new_tensors"] == 12
    assert stages["ingest"]["metrics"]["ingest.ok"] == 13 and stages["ingest"]["state"] == "Completed"
    thread_ingest = stage_runs(threads["tracker"])["ingest"]["metrics"]
    counts = {key: value for key, value in stages["ingest"]["metrics"].items() if key.startswith("ingest.")}
    assert counts == {key: value for key, value in thread_ingest.items() if key.startswith("ingest.")}
    assert stages["fingerprint"]["status"] == "FINISHED" and stages["fingerprint"]["state"] == "Completed"


def test_task_runner_choice():
    from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    assert isinstance(make_task_runner(ExecutionConfig()), ThreadPoolTaskRunner)
    assert isinstance(make_task_runner(ExecutionConfig(task_runner="processes", max_workers=2)), ProcessPoolTaskRunner)
    remote = make_task_runner(ExecutionConfig(task_runner="dask", dask_address="tcp://127.0.0.1:8786"))
    assert isinstance(remote, DaskTaskRunner) and remote.address == "tcp://127.0.0.1:8786"
    local = make_task_runner(ExecutionConfig(task_runner="dask", max_workers=3))
    assert local.cluster_kwargs["n_workers"] == 3 and local.cluster_kwargs["host"] == "127.0.0.1"
    with pytest.raises(ValueError, match="task_runner"):
        ExecutionConfig(task_runner="gpu")


def test_a_run_on_a_cluster_whose_workers_cannot_see_the_workspace_stops_before_any_stage(harness, tmp_path: Path):
    data, root = tmp_path / "data", tmp_path / "ws"
    _images(data)
    root.mkdir()  # the workers get an empty folder of their own at this path (as on a machine without the share)
    with dask_cluster(tmp_path, n_workers=1, hidden=root) as address:
        config = tmp_path / "config.yaml"
        mapping = {
            "sources": {"folders": [{"path": str(data / "real"), "label": "real"}]},
            "execution": {"workspace": str(root), "task_runner": "dask", "dask_address": address},
            "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
            "train": {"weights": "none"},  # offline here: the weights check would stop the run first
        }
        config.write_text(yaml.safe_dump(mapping), encoding="utf-8")
        result = CliRunner().invoke(app, ["run", "--config", str(config)])
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert f"1 of 1 Dask worker(s) of {address} cannot use the workspace {root}" in message, message
    assert "cannot read" in message and "same path" in message, message
    assert not (root / "catalog").exists() or not list((root / "catalog").iterdir())  # no stage ran
    assert not (root / "crawl" / "log.parquet").exists()
    assert [path.name for path in root.iterdir() if path.name.startswith(".cluster-check")] == []
