"""Every script in benchmarks/ runs at its tiny --quick size and prints its JSON, with no connection off the machine:
a renamed module or a changed signature breaks the build, not the next `make bench`. The figures are not checked
(they measure this machine at this moment); benchmarks/README.md describes every script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.network_guard import guarded_environment, read_log

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "benchmarks").glob("bench_*.py"))
# Prefect servers, whole flows
RUN_FLOWS = {"bench_cli", "bench_cli_startup", "bench_dask_scaling", "bench_reference_recipe"}
# These run their flows on the PREFECT_API_URL they are given, here the test process's harness: no server of their
# own to start (bench_cli and bench_cli_startup time Prefect's start-ups, so they start their own).
ON_THE_HARNESS = {"bench_dask_scaling", "bench_reference_recipe"}


def _params() -> list:
    return [
        pytest.param(path, id=path.stem, marks=[pytest.mark.slow] if path.stem in RUN_FLOWS else []) for path in SCRIPTS
    ]


def _environment(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """The guarded environment for one script: its own Prefect home and temporary folder, this checkout first on
    the path, one math thread (the quick sizes gain nothing from more, and on a busy machine threads wait on each
    other at every operation)."""
    env, log = guarded_environment(tmp_path / "guard")
    (tmp_path / "tmp").mkdir()
    env["PYTHONPATH"] = os.pathsep.join(
        [str(tmp_path / "guard"), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    env |= {"PREFECT_HOME": str(tmp_path / "prefect-home"), "TMPDIR": str(tmp_path / "tmp"), "OMP_NUM_THREADS": "1"}
    return env, log


def test_there_are_benchmarks_and_the_readme_describes_each():
    readme = (ROOT / "benchmarks" / "README.md").read_text(encoding="utf-8")
    assert len(SCRIPTS) >= 10, SCRIPTS
    missing = [path.name for path in SCRIPTS if f"## {path.name}" not in readme]
    assert not missing, f"benchmarks/README.md has no section for {missing}"


@pytest.mark.parametrize("script", _params())
def test_the_benchmark_runs_at_its_quick_size_and_prints_its_json(
    script: Path, tmp_path: Path, request: pytest.FixtureRequest
):
    env, log = _environment(tmp_path)
    if script.stem in ON_THE_HARNESS:
        env["PREFECT_API_URL"] = request.getfixturevalue("harness")
    command = [sys.executable, str(script), "--quick"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500, check=False)
    assert result.returncode == 0, f"{script.name} --quick exited {result.returncode}:\n{result.stderr[-4000:]}"
    try:
        summary = json.loads(result.stdout)
    except ValueError:
        pytest.fail(f"{script.name} --quick printed no single JSON object on stdout:\n{result.stdout[-2000:]}")
    assert summary.get("benchmark") == script.stem.removeprefix("bench_"), summary
    assert summary.get("quick") is True, f"{script.name} did not report a quick run: {sorted(summary)}"
    remote = [entry for entry in read_log(log) if entry["kind"] == "remote"]
    assert not remote, f"{script.name} tried to connect off the machine: {remote}"
