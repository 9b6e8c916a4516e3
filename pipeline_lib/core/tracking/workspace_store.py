"""The workspace's own MLflow store (mlflow.db): checked before a command relies on it, and its artifact locations
kept inside the workspace it is in.

MLflow's SQLite store keeps absolute locations: `artifact_location` per experiment and logged model,
`artifact_uri` per run, `storage_location` per model version. A copied or moved workspace would keep writing its
runs and models into the original's mlartifacts/ (and lose them with it). MLflow's client cannot change those
columns, so open_store re-points them with one SQL transaction: every location under the mlartifacts/ folder an
experiment of this store was created with, moved onto this workspace's mlartifacts/. Only the workspace's own
store is touched (a configured tracking.uri is never rewritten), and only when a location points elsewhere.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from pathlib import Path

from pipeline_lib.core.workspace import Workspace

log = logging.getLogger(__name__)

ARTIFACTS_DIR = "mlartifacts"  # store.artifact_root's folder: where the workspace's runs keep their artifacts
# Every column of MLflow's SQLite schema that holds an artifact location (a column the store's schema lacks is skipped).
LOCATION_COLUMNS = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("logged_models", "artifact_location"),
    ("model_versions", "storage_location"),
    ("model_versions", "source"),
)
BUSY_TIMEOUT_S = 120.0  # a run writing to the store at the same time holds SQLite's write lock for moments only


class TrackingStoreError(RuntimeError):
    """The tracking store cannot be used (a damaged mlflow.db); the message names the file and what to do."""


def sqlite_file(uri: str) -> Path | None:
    """The database file of a sqlite:/// tracking URI, or None for any other store."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///"))


def _read_only(path: Path) -> contextlib.closing[sqlite3.Connection]:
    return contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S))


def sqlite_problem(path: Path) -> str | None:
    """What SQLite's quick_check finds wrong with a database file (one line), or None when it is sound.

    A process killed in the middle of a write leaves a hot journal, which a read-only connection cannot roll back
    ("attempt to write a readonly database"): the check then opens the file read-write once, as MLflow would, so
    that SQLite rolls the unfinished write back (its own recovery) and checks what is left."""
    try:
        return _quick_check(_read_only(path))
    except sqlite3.OperationalError as error:
        if "readonly" not in str(error) or not path.with_name(path.name + "-journal").exists():
            return f"{type(error).__name__}: {error}"
    except sqlite3.DatabaseError as error:
        return f"{type(error).__name__}: {error}"
    try:
        return _quick_check(contextlib.closing(sqlite3.connect(path, timeout=BUSY_TIMEOUT_S)))
    except sqlite3.DatabaseError as error:
        return f"{type(error).__name__}: {error}"


def _quick_check(opened: contextlib.closing[sqlite3.Connection]) -> str | None:
    with opened as connection:
        found = [row[0] for row in connection.execute("PRAGMA quick_check(3)")]
    return None if found == ["ok"] else "; ".join(" ".join(str(item).split()) for item in found)


def _client_problem(uri: str) -> str | None:
    """What goes wrong when MLflow's client reads the store's experiments and registered models, or None."""
    from mlflow import MlflowClient

    from pipeline_lib.core.tracking.store import quiet

    try:
        with quiet():
            client = MlflowClient(tracking_uri=uri)
            client.search_experiments(max_results=1)
            client.search_registered_models(max_results=1)
    except Exception as error:  # noqa: BLE001 - MLflow, SQLAlchemy and sqlite3 each raise their own types
        return f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"
    return None


def check_store(uri: str, deep: bool = True) -> None:
    """TrackingStoreError naming the file when a SQLite tracking store is damaged: SQLite's quick_check, then
    (deep) a query through MLflow's client. A store not made yet, or on a server, passes."""
    path = sqlite_file(uri)
    if path is None or not path.exists():
        return
    problem = sqlite_problem(path) or (_client_problem(uri) if deep else None)
    if problem:
        raise TrackingStoreError(
            f"the MLflow store {path} is damaged ({problem}): move it aside (mv {path} {path}.damaged) to start a "
            "new one, or restore it from a backup; runs recorded in it are not lost with the move"
        )


def _columns(connection: sqlite3.Connection) -> list[tuple[str, str]]:
    """The LOCATION_COLUMNS this database has."""
    present = []
    for table, column in LOCATION_COLUMNS:
        names = {row[1] for row in connection.execute(f"PRAGMA table_info({table})")}
        if column in names:
            present.append((table, column))
    return present


def foreign_roots(path: Path, root_uri: str) -> list[str]:
    """The artifact roots (file URIs of an mlartifacts/ folder) the store's experiments were created with that are
    not root_uri: where a copied or moved workspace's store still points."""
    suffix = f"/{ARTIFACTS_DIR}"
    with _read_only(path) as connection:
        if ("experiments", "artifact_location") not in _columns(connection):
            return []
        rows = connection.execute("SELECT DISTINCT artifact_location FROM experiments").fetchall()
    return sorted(
        location
        for (location,) in rows
        if isinstance(location, str) and location.startswith("file:") and location.endswith(suffix)
        and location != root_uri
    )


def relocate_artifacts(workspace: Workspace) -> int:
    """Re-point every artifact location of the workspace's mlflow.db that lies under another workspace's
    mlartifacts/ onto this one's (one transaction); the number of rows changed (0: nothing pointed elsewhere)."""
    path = workspace.root / "mlflow.db"
    root_uri = (workspace.root / ARTIFACTS_DIR).as_uri()
    if not path.is_file():
        return 0
    old_roots = foreign_roots(path, root_uri)
    if not old_roots:
        return 0
    changed = 0
    with contextlib.closing(sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)) as connection:
        connection.execute("BEGIN IMMEDIATE")
        try:
            for old in old_roots:
                for table, column in _columns(connection):
                    changed += connection.execute(
                        f"UPDATE {table} SET {column} = ? || substr({column}, ?) "  # noqa: S608 - names are ours
                        f"WHERE {column} = ? OR substr({column}, 1, ?) = ?",
                        (root_uri, len(old) + 1, old, len(old) + 1, f"{old}/"),
                    ).rowcount
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise
    _forget_cached_locations()
    log.warning(
        "workspace %s was copied or moved from %s: %d MLflow artifact location(s) now point into it",
        workspace.root, ", ".join(old_roots), changed,
    )  # fmt: skip
    return changed


def _forget_cached_locations() -> None:
    """Drop the artifact repositories MLflow keeps per run and logged model in this process (by id): those made
    before the move still point at the old place."""
    from mlflow.tracking._tracking_service import utils

    cache = getattr(utils, "_artifact_repos_cache", None)  # a private cache: gone in some MLflow, nothing to drop
    if cache is not None:
        cache.clear()


def open_store(configured_uri: str | None, workspace: Workspace) -> str:
    """The tracking URI a command of this workspace uses, checked (TrackingStoreError if damaged); the workspace's
    own store first has its artifact locations re-pointed into this workspace (relocate_artifacts)."""
    from pipeline_lib.core.tracking.store import tracking_uri

    uri = tracking_uri(configured_uri, workspace)
    check_store(uri)
    if not configured_uri:
        relocate_artifacts(workspace)
    return uri
