"""Shared fixtures: tiny generated images and an isolated MLflow store per test."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline_lib.workspace import Workspace


@pytest.fixture
def workspace(tmp_path: Path) -> Workspace:
    return Workspace.create(tmp_path / "ws")


@pytest.fixture(autouse=True)
def _isolated_mlflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never let a test touch ./mlruns or a real server."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow-default.db'}")


def make_image(path: Path, seed: int = 0, size: tuple[int, int] = (48, 40), fmt: str = "JPEG") -> Path:
    """A small random-but-structured RGB image written to path."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=(4, 4, 3), dtype=np.uint8)
    image = Image.fromarray(base).resize(size, Image.Resampling.BICUBIC)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, fmt)
    return path
