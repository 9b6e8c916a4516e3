"""Shared test helpers: tiny generated images, a tiny classifier, and an isolated MLflow store per test."""

from __future__ import annotations

import os
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

from pipeline_lib.core.devices import usable_cpu_count
from pipeline_lib.core.workspace import Workspace
from tests import checkout_lock

NEEDED_TEMP_BYTES = 2 * 2**30  # a whole run peaks at about 1.4 GB in pytest's temporary folder per process
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


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


def pytest_configure(config: pytest.Config) -> None:
    """In a pytest-xdist worker, torch gets its share of the cores (two workers with two threads each on two cores
    run slower than with one each), and so do the processes a test starts."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        threads = max(1, usable_cpu_count() // workers)
        torch.set_num_threads(threads)
        for name in THREAD_VARIABLES:
            os.environ.setdefault(name, str(threads))


# Modules whose tests one xdist worker runs together, in order (a module fixture that must be built once). Named
# here, not with xdist's xdist_group mark: pytest-xdist 3.8 groups by renaming item._nodeid, which pytest 9 ignores.
ONE_WORKER_MODULES = frozenset({"tests/flows/test_cache_matrix.py"})


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """pytest-xdist hands out single tests, except that a module of ONE_WORKER_MODULES goes to one worker whole."""
    from xdist.scheduler import LoadScopeScheduling

    class Scheduler(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return module if module in ONE_WORKER_MODULES else nodeid

    return Scheduler(config, log)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The modules that hold a test marked slow run first, each module in its own order: run in parallel, the long
    tests start at once and the short ones fill the gaps at the end (the order is the same in every worker)."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> object:
    """Every test (fixtures included) runs while no test edits the checkout's files (tests/checkout_lock.py)."""
    if item.get_closest_marker("edits_checkout"):
        return (yield)
    with checkout_lock.reading():
        return (yield)


@pytest.fixture(scope="session")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One Prefect test harness (temporary server + database in tmp) per test process, for every flow test and the
    benchmarks that run flows; its server sends nothing out. Yields its API URL."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    settings = {PREFECT_HOME: str(tmp_path_factory.mktemp("prefect-home")), PREFECT_SERVER_ANALYTICS_ENABLED: False}
    with temporary_settings(settings):
        # a generous limit: on a machine with load 8 on 2 cores the server's first answer can take minutes; pytest's
        # 1800 s per test (which counts this setup) still ends a server that never answers
        with prefect_test_harness(server_startup_timeout=480):
            yield str(PREFECT_API_URL.value())


@pytest.fixture(scope="session")
def toy_checkpoint_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A resnet18 checkpoint (weights drawn from seed 0, image size 32), made once per test process: read it, or take
    toy_checkpoint to get a copy of one's own."""
    from pipeline_lib.learn import models

    with torch.random.fork_rng():  # the tests that run after this one draw what they drew before
        torch.manual_seed(0)
        model, _ = models.build_model("resnet18", "none")
    path = tmp_path_factory.mktemp("toy-checkpoint") / "model.pt"
    models.save_checkpoint(path, model, {"image_size": 32})
    return path


@pytest.fixture
def toy_checkpoint(toy_checkpoint_file: Path, tmp_path: Path) -> Path:
    """The session's toy checkpoint copied to tmp_path/model.pt: the test may change it or write files beside it."""
    return Path(shutil.copyfile(toy_checkpoint_file, tmp_path / "model.pt"))


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
