"""Shared test helpers: tiny generated images, a tiny classifier, and an isolated MLflow store per test."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision.models import resnet18

from pipeline_lib.core.workspace import Workspace

NEEDED_TEMP_BYTES = 2 * 2**30  # a whole run peaks at about 1.4 GB in pytest's temporary folder


def pytest_sessionstart(session: pytest.Session) -> None:
    """Say up front when the temporary folder's disk is too small: a full disk fails tests far from the cause."""
    folder = tempfile.gettempdir()
    free = shutil.disk_usage(folder).free
    if free < NEEDED_TEMP_BYTES:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        need = NEEDED_TEMP_BYTES / 2**30
        line = f"WARNING: {free / 2**30:.1f} GiB free in {folder}; the tests need about {need:.0f} GiB"
        if reporter is not None:
            reporter.write_line(line, yellow=True, bold=True)


@pytest.fixture
def workspace(tmp_path: Path) -> Workspace:
    return Workspace.create(tmp_path / "ws")


@pytest.fixture(autouse=True)
def _isolated_mlflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never let a test touch ./mlruns or a real server."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow-default.db'}")


@pytest.fixture
def outside_secret() -> Iterator[Path]:
    """A secret PNG (readable, a valid image) in a folder of its own outside pytest's tmp_path, removed at the end:
    the target of symlinks that an import must never follow."""
    folder = Path(tempfile.mkdtemp(prefix="aidetect-secret-"))
    try:
        yield make_image(folder / "shadow.png", seed=4242, size=(64, 64), fmt="PNG")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def files_holding(root: Path, data: bytes) -> list[Path]:
    """Every file under root whose bytes contain data (symlinks are not followed)."""
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink() and data in p.read_bytes()]


HOLDER = """
import sys
from pathlib import Path
from pipeline_lib.core.workspace import Workspace, workspace_lock
workspace = Workspace.create(sys.argv[1]) if sys.argv[2] == "create" else Workspace(Path(sys.argv[1]))
with workspace_lock(workspace, "aidetect run (test holder)"):
    print("locked", flush=True)
    sys.stdin.read()
"""


def hold_workspace_lock(root: Path, create: bool = True) -> subprocess.Popen:
    """A second process that holds the workspace lock (the real one) until its stdin closes; returns once it holds
    it. create=False: it locks the folder as it is, as a command holds a new workspace's folder before it makes the
    workspace in it. Close its stdin and wait for it to let go."""
    how = "create" if create else "as-is"
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(root), how], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None and process.stdout.readline().strip() == "locked"
    return process


def make_image(path: Path, seed: int = 0, size: tuple[int, int] = (48, 40), fmt: str = "JPEG") -> Path:
    """A small random-but-structured RGB image written to path."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=(4, 4, 3), dtype=np.uint8)
    image = Image.fromarray(base).resize(size, Image.Resampling.BICUBIC)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, fmt)
    return path


class TinyClassifier(nn.Module):
    """Same interface as pipeline_lib.learn.models.Classifier: [0,1] NCHW floats in, logits [N,2] out."""

    def __init__(self) -> None:
        super().__init__()
        self.net = resnet18(weights=None, num_classes=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MarkerPayload:
    """Unpickling this creates a marker file: what an attacker's replaced model.pth would do instead."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))
