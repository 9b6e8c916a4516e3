"""The workspace's own MLflow store: a damaged mlflow.db named before it is used, and artifact locations that follow
a copied or moved workspace. Real MLflow on SQLite in tmp_path."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipeline_lib.core.tracking.runs import start_run
from pipeline_lib.core.tracking.store import tracking_uri
from pipeline_lib.core.tracking.workspace_store import (
    LOCATION_COLUMNS,
    TrackingStoreError,
    check_store,
    open_store,
    relocate_artifacts,
    sqlite_problem,
)
from pipeline_lib.core.workspace import Workspace


def damage_table(database: Path, table: str) -> None:
    """Overwrite the first page of a table with junk, as a bad disk block or a careless edit would."""
    with sqlite3.connect(database) as connection:
        page = connection.execute("PRAGMA page_size").fetchone()[0]
        root = connection.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)).fetchone()[0]
    with open(database, "r+b") as handle:
        handle.seek((root - 1) * page)
        handle.write(b"\xa5" * page)


def _store_with_a_model(workspace: Workspace) -> str:
    uri = tracking_uri(None, workspace)
    tracker = start_run(uri, "aidetect", workspace, "run")
    tracker.log_text("hello", "notes/a.txt")
    MlflowClient(tracking_uri=uri).create_registered_model("aidetect")
    return uri


def test_a_damaged_store_is_named_with_what_to_do(workspace):
    uri = _store_with_a_model(workspace)
    check_store(uri)  # sound
    database = workspace.root / "mlflow.db"
    damage_table(database, "registered_models")
    for deep in (False, True):
        with pytest.raises(TrackingStoreError) as info:
            check_store(uri, deep=deep)
        message = str(info.value)
        assert str(database) in message and "damaged" in message and f"mv {database}" in message, message
        assert "\n" not in message
    assert sqlite_problem(database) is not None


def test_a_file_that_is_no_database_and_a_missing_store(tmp_path: Path):
    junk = tmp_path / "mlflow.db"
    junk.write_bytes(b"this is not SQLite" * 300)
    with pytest.raises(TrackingStoreError, match="DatabaseError: file is not a database"):
        check_store(f"sqlite:///{junk}")
    check_store(f"sqlite:///{tmp_path / 'not-made-yet.db'}")  # a new store: MLflow makes it
    check_store("http://127.0.0.1:1")  # a server is not a file to check


def _locations(database: Path) -> list[str]:
    found = []
    with sqlite3.connect(database) as connection:
        for table, column in LOCATION_COLUMNS:
            found += [row[0] for row in connection.execute(f"SELECT {column} FROM {table}") if row[0]]
    return found


def test_a_copied_workspace_keeps_its_runs_and_models_to_itself(tmp_path: Path):
    original = Workspace.create(tmp_path / "original")
    uri = _store_with_a_model(original)
    run_id = MlflowClient(tracking_uri=uri).search_runs(["1"])[0].info.run_id
    copy = Workspace.create(shutil.copytree(original.root, tmp_path / "copy"))
    shutil.rmtree(original.root)
    uri = open_store(None, copy)
    assert uri == f"sqlite:///{copy.root / 'mlflow.db'}"
    file_locations = [loc for loc in _locations(copy.root / "mlflow.db") if "mlartifacts" in loc]
    assert file_locations and all(loc.startswith((copy.root / "mlartifacts").as_uri()) for loc in file_locations)
    client = MlflowClient(tracking_uri=uri)
    assert Path(client.download_artifacts(run_id, "notes/a.txt", str(tmp_path))).read_text(encoding="utf-8") == "hello"
    client.log_text(run_id, "more", "notes/b.txt")  # an old run of the copy
    start_run(uri, "aidetect", copy, "new run").log_text("new", "notes/c.txt")  # a new one
    assert not original.root.exists(), f"the copy wrote into the original: {sorted(original.root.rglob('*'))}"
    assert len(list((copy.root / "mlartifacts").rglob("*.txt"))) == 3
    assert relocate_artifacts(copy) == 0, "a second open finds nothing to re-point"


def test_a_configured_store_is_never_rewritten(tmp_path: Path):
    original = Workspace.create(tmp_path / "original")
    _store_with_a_model(original)
    elsewhere = tmp_path / "shared.db"
    shutil.copy(original.root / "mlflow.db", elsewhere)
    before = elsewhere.read_bytes()
    other = Workspace.create(tmp_path / "other")
    assert open_store(f"sqlite:///{elsewhere}", other) == f"sqlite:///{elsewhere}"
    assert elsewhere.read_bytes() == before


KILLED_WRITER = """
import os, sqlite3, sys
connection = sqlite3.connect(sys.argv[1], isolation_level=None)
connection.execute("PRAGMA cache_size=1")  # spill the change into the file, so that only the journal can undo it
connection.execute("BEGIN")
connection.executemany("INSERT INTO t VALUES (?)", [("x" * 500,) for _ in range(2000)])
os._exit(0)  # killed mid-write: the journal stays hot
"""


def test_a_store_left_by_a_killed_writer_is_rolled_back_not_called_damaged(tmp_path: Path):
    """A SIGKILLed run leaves mlflow.db with a hot journal: the store is sound."""
    import subprocess
    import sys

    path = tmp_path / "mlflow.db"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE t (v TEXT)")
        connection.execute("INSERT INTO t VALUES ('kept')")
    subprocess.run([sys.executable, "-c", KILLED_WRITER, str(path)], check=True)
    journal = path.with_name("mlflow.db-journal")
    assert journal.exists() and journal.stat().st_size > 0, "the killed writer must leave a hot journal"
    assert sqlite_problem(path) is None, "a hot journal is SQLite's to roll back, not damage"
    with sqlite3.connect(path) as connection:
        assert connection.execute("SELECT v FROM t").fetchall() == [("kept",)], "the unfinished write was not undone"
