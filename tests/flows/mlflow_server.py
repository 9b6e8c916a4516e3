"""Servers for tests, on loopback: a real `mlflow server` over a workspace's store, and helpers to start any server."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, server: subprocess.Popen, seconds: float) -> None:
    """Return once GET url answers 200; raise if the server process exits or the time runs out."""
    deadline = time.monotonic() + seconds
    while True:
        if server.poll() is not None:
            raise RuntimeError(f"server for {url} exited with {server.returncode}")
        try:  # a slow first answer on a busy machine is waited for, not cut off and asked again
            with urllib.request.urlopen(url, timeout=max(1.0, min(30.0, deadline - time.monotonic()))) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer in {seconds} s")
        time.sleep(0.5)


def stop(server: subprocess.Popen) -> None:
    """Terminate a server process; kill it if it has not exited after 20 s."""
    server.terminate()
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.kill()


@contextlib.contextmanager
def mlflow_server(backend_uri: str, artifact_root: Path, seconds: float = 480, proxy: bool = False) -> Iterator[str]:
    """Start `mlflow server` on 127.0.0.1 (stopped on exit); yield its base URL once /health answers.

    proxy: the server stores artifacts under artifact_root itself (--artifacts-destination) and clients upload them
    through it, as in the team setup (deploy/); otherwise clients write to artifact_root directly.
    """
    port = free_port()
    artifacts = ["--artifacts-destination" if proxy else "--default-artifact-root", artifact_root.as_uri()]
    command = [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--backend-store-uri",
        backend_uri,
        *artifacts,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(f"{base}/health", server, seconds)
        yield base
    finally:
        stop(server)


def get_json(base: str, path: str) -> dict[str, Any]:
    """GET a REST endpoint of the MLflow server and decode its JSON."""
    with urllib.request.urlopen(f"{base}{path}", timeout=30) as response:
        return json.loads(response.read().decode("utf-8"))


def post_json(base: str, path: str, body: dict[str, Any]) -> Any:
    """POST a JSON body to a server's REST API (MLflow's searches, Prefect's filters) and decode its JSON answer."""
    request = urllib.request.Request(
        f"{base}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read().decode("utf-8"))
