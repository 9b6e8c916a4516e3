"""Benchmark: how fast `aidetect` answers --help, input errors, a missing workspace and `status`.

Each command runs as a fresh process (`python -c "from flows.cli import main; main()" ...`), as a user's shell would
start it. The naive way, in the same run: a process that imports what the CLI needs for a flow run up front (torch,
Prefect, MLflow), which is what every command paid before the imports were made lazy. Prints one JSON object on
stdout (median seconds per command and its ratio to the eager import); progress goes to stderr.
Usage: .venv/bin/python benchmarks/bench_cli.py [--repeats N] [--quick]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from pipeline_lib.core.workspace import Workspace

log = logging.getLogger("bench_cli")
REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-c", "from flows.cli import main; main()"]
EAGER = [sys.executable, "-c", "import torch, prefect, mlflow, pandas"]
TARGET_S = 2.0


def _time(command: list[str], env: dict[str, str], expect: int) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != expect:
        raise RuntimeError(f"{command[3:]} exited {done.returncode}, expected {expect}: {done.stderr[-500:]}")
    return seconds


def _commands(root: Path) -> dict[str, tuple[list[str], int]]:
    images = root / "images"
    images.mkdir()
    Image.new("RGB", (64, 64), (90, 120, 30)).save(images / "a.jpg")
    bad_config = root / "bad.yaml"
    bad_config.write_text("train:\n  epoch: 3\n", encoding="utf-8")
    workspace = root / "ws"
    Workspace.create(workspace)
    nowhere = str(root / "nowhere")
    return {
        "help": ([*CLI, "--help"], 0),
        "config_error": ([*CLI, "run", "--config", str(bad_config), "-w", str(workspace)], 2),
        "bad_group_by_regex": ([*CLI, "import", str(images), "--label", "ai", "--group-by", "pattern:(["], 2),
        "empty_import_folder": ([*CLI, "import", str(root / "empty"), "--label", "ai"], 2),
        "status_missing_workspace": ([*CLI, "status", "-w", nowhere], 2),
        "predict_missing_workspace": ([*CLI, "predict", str(images), "-w", nowhere], 2),
        "status": ([*CLI, "status", "-w", str(workspace)], 0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=None, help="runs per command, the median kept (5; --quick 1)")
    parser.add_argument("--quick", action="store_true", help="one run per command: checks the script, in seconds")
    args = parser.parse_args()
    args.repeats = args.repeats or (1 if args.quick else 5)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    env = os.environ | {"MLFLOW_DISABLE_TELEMETRY": "true"}
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / "empty").mkdir()
        commands = _commands(root)
        env["PREFECT_HOME"] = str(root / "prefect-home")
        runs: dict[str, list[float]] = {name: [] for name in [*commands, "python_start", "eager_imports"]}
        for repeat in range(args.repeats):  # interleaved, so that load from other work hits every command alike
            log.info("repeat %d of %d", repeat + 1, args.repeats)
            runs["python_start"].append(_time([sys.executable, "-c", "pass"], env, 0))
            runs["eager_imports"].append(_time(EAGER, env, 0))
            for name, (command, expect) in commands.items():
                runs[name].append(_time(command, env, expect))
    median = {name: statistics.median(values) for name, values in runs.items()}
    eager = median["eager_imports"]
    result = {
        "benchmark": "cli",
        "quick": args.quick,
        "cpu_count": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],
        "repeats": args.repeats,
        "target_s": TARGET_S,
        "median_s": {name: round(value, 3) for name, value in median.items()},
        "ratio_to_eager_imports": {name: round(median[name] / eager, 3) for name in commands},
        "within_target": {name: median[name] <= TARGET_S for name in commands},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
