"""The team setup's servers for tests, as docs/team.md starts them with plain commands, on loopback only.

PostgreSQL (initdb + postgres, as an unprivileged user when the tests run as root), a Prefect server on a database
URL, and a Dask scheduler with `dask worker` processes (optionally one that cannot see a folder: started in its own
mount namespace with an empty tmpfs over that folder). Every server stops when its `with` block ends.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.flows.mlflow_server import free_port, wait_healthy

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]
PG_USER = "aidetect"  # the superuser initdb creates by default; loopback connections need no password (trust)


def postgres_bindir() -> Path | None:
    """The folder of PostgreSQL's server programs: on PATH, or Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which("initdb")
    if found and shutil.which("postgres"):
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    return versions[-1].parent if versions else None


def require_postgres() -> Path:
    """The PostgreSQL bin folder, or skip the test saying how to get one (CI installs it: .ci/run)."""
    bindir = postgres_bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL server programs (initdb, postgres): `apt-get install postgresql` (.ci/run does)")
    return bindir


def stop_group(process: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Signal a server's whole process group (it was started in its own session); kill it after 30 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def _server_user() -> tuple[int, int] | None:
    """(uid, gid) to run PostgreSQL as when this process is root (it refuses to): Debian's postgres user, or nobody."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            entry = pwd.getpwnam(name)
            return entry.pw_uid, entry.pw_gid
    raise RuntimeError("running as root and neither a postgres nor a nobody user exists to run PostgreSQL")


def _as_user(user: tuple[int, int] | None) -> dict[str, object]:
    return {} if user is None else {"user": user[0], "group": user[1], "extra_groups": []}


@contextlib.contextmanager
def _data_home(tmp_path: Path, user: tuple[int, int] | None) -> Iterator[Path]:
    """A folder for the cluster's data that its user owns: in tmp_path, or (as root, since pytest's folders are
    private to root) a fresh private folder under the system's temp folder, removed afterwards."""
    if user is None:
        yield tmp_path
        return
    home = Path(tempfile.mkdtemp(prefix="aidetect-test-pg-"))
    try:
        os.chown(home, *user)
        yield home
    finally:
        shutil.rmtree(home, ignore_errors=True)


@contextlib.contextmanager
def postgres(
    tmp_path: Path, databases: tuple[str, ...], seconds: float = 120, superuser: str = PG_USER
) -> Iterator[str]:
    """A fresh PostgreSQL cluster on 127.0.0.1 with the given databases; yields postgresql://SUPERUSER@127.0.0.1:PORT."""
    bindir = require_postgres()
    user = _server_user()
    port = free_port()
    log = (tmp_path / "postgres.log").open("wb")
    with _data_home(tmp_path, user) as home, log:
        data = home / "pgdata"
        initdb = [str(bindir / "initdb"), "-D", str(data), "-U", superuser, "--auth=trust", "-E", "UTF8", "--no-sync"]
        subprocess.run([*initdb, "--locale=C"], cwd=home, stdout=log, stderr=log, check=True, **_as_user(user))
        command = [str(bindir / "postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(port), "-k", ""]
        command += ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
        server = subprocess.Popen(
            command, cwd=home, stdout=log, stderr=log, start_new_session=True, **_as_user(user)
        )
        url = f"postgresql://{superuser}@127.0.0.1:{port}"
        try:
            _create_databases(url, databases, server, seconds)
            yield url
        finally:
            stop_group(server, signal.SIGINT)  # SIGINT: PostgreSQL's fast shutdown


def _create_databases(url: str, databases: tuple[str, ...], server: subprocess.Popen, seconds: float) -> None:
    """Wait until the server accepts connections, then create the databases."""
    import psycopg

    deadline = time.monotonic() + seconds
    while True:
        if server.poll() is not None:
            raise RuntimeError(f"PostgreSQL exited with {server.returncode} (see postgres.log in the test's tmp_path)")
        try:
            connection = psycopg.connect(f"{url}/postgres", connect_timeout=5, autocommit=True)
            break
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)
    with connection:  # autocommit: CREATE DATABASE cannot run in a transaction
        for name in databases:
            connection.execute(f'CREATE DATABASE "{name}"')


def prefect_cli(env: dict[str, str], *args: str, cwd: Path | None = None, timeout: float = 300) -> str:
    """Run `prefect --no-prompt ARGS` against the server env points at; its stdout (an assertion error if it fails)."""
    done = subprocess.run(
        [str(BIN / "prefect"), "--no-prompt", *args],
        env={**env, "COLUMNS": "300"},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, f"prefect {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@contextlib.contextmanager
def prefect_server(tmp_path: Path, database_url: str, seconds: float = 180) -> Iterator[dict[str, str]]:
    """`prefect server start` on 127.0.0.1 with its database at database_url; yields the env that points at it."""
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_DATABASE_CONNECTION_URL": database_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
    }
    env.pop("PREFECT_API_URL", None)
    log = (tmp_path / "prefect-server.log").open("wb")
    command = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with log:
        server = subprocess.Popen(command, env=env, stdout=log, stderr=log, start_new_session=True)
        api = f"http://127.0.0.1:{port}/api"
        try:
            wait_healthy(f"{api}/health", server, seconds)
            yield {**env, "PREFECT_API_URL": api}
        finally:
            stop_group(server)


def hide_command(folder: Path) -> list[str] | None:
    """A command prefix that runs a program in its own mount namespace where folder is an empty tmpfs (so the
    program sees another, empty folder at the same path), or None where this machine cannot do that."""
    user_ns = [] if os.geteuid() == 0 else ["-U", "-r"]  # a non-root user needs its own user namespace to mount
    prefix = ["unshare", *user_ns, "-m", "--propagation", "private", "--"]
    prefix += ["sh", "-c", 'mount -t tmpfs aidetect-hidden "$0" && exec "$@"', str(folder)]
    if shutil.which("unshare") is None:
        return None
    probe = subprocess.run([*prefix, "sh", "-c", 'test -z "$(ls -A "$0")"', str(folder)], capture_output=True)
    return prefix if probe.returncode == 0 else None


@contextlib.contextmanager
def dask_cluster(tmp_path: Path, n_workers: int, hidden: Path | None = None, seconds: float = 120) -> Iterator[str]:
    """`dask scheduler` and `dask worker --nworkers n_workers` (separate processes) on 127.0.0.1; yields the
    scheduler's address once every worker joined. With hidden, the workers see an empty folder at that path."""
    from distributed import Client

    port, http_port = free_port(), free_port()
    address = f"tcp://127.0.0.1:{port}"
    scheduler_cmd = [str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port)]
    scheduler_cmd += ["--dashboard-address", f"127.0.0.1:{http_port}"]
    worker_cmd = [str(BIN / "dask"), "worker", address, "--nworkers", str(n_workers), "--nthreads", "1"]
    worker_cmd += ["--no-dashboard", "--local-directory", str(tmp_path / "dask-scratch"), "--host", "127.0.0.1"]
    if hidden is not None:
        prefix = hide_command(hidden)
        if prefix is None:
            pytest.skip(f"cannot start a process that does not see {hidden}: no mount namespace (unshare -m) here")
        worker_cmd = [*prefix, *worker_cmd]
    # Scheduler and workers unpickle the task graph: they import aidetect as installed, and these tests' own flows
    # (a flow in tests/ rides along with every task) from the checkout.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    logs = [(tmp_path / name).open("wb") for name in ("dask-scheduler.log", "dask-worker.log")]
    processes: list[subprocess.Popen] = []
    try:
        processes.append(
            subprocess.Popen(scheduler_cmd, env=env, stdout=logs[0], stderr=logs[0], start_new_session=True)
        )
        wait_healthy(f"http://127.0.0.1:{http_port}/health", processes[0], seconds)
        processes.append(
            subprocess.Popen(worker_cmd, env=env, stdout=logs[1], stderr=logs[1], start_new_session=True)
        )
        with Client(address, timeout=seconds, set_as_default=False) as client:
            client.wait_for_workers(n_workers, timeout=seconds)
            client.run(importlib.import_module, "tasks.per_image")  # warm, as a long-lived cluster's workers are
        yield address
    finally:
        for process in reversed(processes):
            stop_group(process)
        for log in logs:
            log.close()


def chunk_tasks_on(address: str) -> dict[str, int]:
    """How many validate, hash and tensor chunk tasks the Dask scheduler at address ran, and its worker processes
    (none of which is this one)."""
    from distributed import Client

    def count(dask_scheduler: Any) -> dict[str, int]:  # runs in the scheduler's process (pickled by value)
        prefixes = dask_scheduler.task_prefixes
        return {
            part: sum(sum(p.state_counts.values()) for name, p in prefixes.items() if part in name)
            for part in ("validate", "hash", "tensor")
        }

    with Client(address, set_as_default=False, timeout=60) as client:
        pids = set(client.run(os.getpid).values())
        return client.run_on_scheduler(count) | {"worker_processes": len(pids - {os.getpid()})}
