"""Benchmark: how fast `aidetect` answers --help, input errors, a missing workspace and `status`; what an all-cached
`aidetect run` costs.

Each command runs as a fresh process (`python -c "from flows.cli import main; main()" ...`), as a user's shell would
start it. The naive way, in the same run: a process that imports what the CLI needs for a flow run up front (torch,
Prefect, MLflow), which is what every command paid before the imports were made lazy. Prints one JSON object on
stdout (median seconds per command and its ratio to the eager import); progress goes to stderr.

The fixed cost of a command (`all_cached_run`): on a small synthetic workspace whose stages have all run once, an
`aidetect run` that finds every stage but the crawl cached, timed as a whole process twice: plain (Prefect's
temporary server, started by the command) and with a server kept up by `aidetect server start`; beside a bare
`python -c "import prefect"` in the same run. Each figure comes with the CPU seconds of the command's processes
(the temporary server's included; the kept-up server's own CPU apart): on a loaded machine they say more than the
wall time, and on an idle one they bound it from below. --skip-cached-run leaves that part out.
Usage: .venv/bin/python benchmarks/bench_cli.py [--repeats N] [--quick] [--skip-cached-run]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
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


# ---------------------------------------------------------------------------------------------------------------
# The fixed cost of a command: an all-cached `aidetect run`

BARE_PREFECT = [sys.executable, "-c", "import prefect"]
CACHED_RUN_TARGETS_S = {"kept_up_server": 10.0, "temporary_server": 20.0}  # on an idle 2-core machine (issue 26)


def cached_run_config(root: Path, persons: int) -> Path:
    """A config over a small synthetic data set: folder sources only (nothing to fetch), a tiny model, review auto."""
    from pipeline_lib.ops import demo_data

    data = demo_data.generate_demo_dataset(root / "data", n_persons_per_class=persons, image_size=64, seed=3)
    config = {
        "sources": {
            "folders": [
                {"path": str(data.site_dir), "label": "real", "group_by": "folder"},
                {"path": str(data.ai_dir), "label": "ai", "group_by": "folder", "generator": "synthetic"},
            ]
        },
        "review": {"mode": "auto"},
        "ingest": {"min_side": 32},
        "split": {"train": 0.6, "val": 0.2, "test": 0.2, "min_groups_per_label": 2},
        "train": {
            "model": "resnet18",
            "weights": "none",
            "image_size": 32,
            "batch_size": 16,
            "epochs": 2,
            "head_only_epochs": 1,
            "num_workers": 0,
        },
        "evaluate": {"bootstrap": 50},
        "report": {"images_per_cell": 2},
        "execution": {"workspace": str(root / "ws")},
    }
    path = root / "cached-run.yaml"
    path.write_text(json.dumps(config, indent=1), encoding="utf-8")  # JSON is YAML
    return path


def _group_cpu_s(leader: int) -> float:
    """CPU seconds (user + system, waited-for children included) of the processes in leader's process group."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[2]) == leader:  # fields after the name: state, ppid, pgrp, ..., utime at 11 .. cstime at 14
            total += sum(int(value) for value in fields[11:15])
    return total / ticks


def _timed_with_cpu(command: list[str], env: dict[str, str], server_pid: int | None = None) -> dict[str, float]:
    """Wall and CPU seconds of one command (its waited-for children included), and the kept-up server's CPU."""
    server_before = _group_cpu_s(server_pid) if server_pid else 0.0
    before = os.times()
    load = os.getloadavg()[0]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    after = os.times()
    if done.returncode != 0:
        raise RuntimeError(f"{command[3:]} exited {done.returncode}: {done.stderr[-2000:]}")
    cpu = after.children_user - before.children_user + after.children_system - before.children_system
    server = _group_cpu_s(server_pid) - server_before if server_pid else 0.0
    return {"wall_s": wall, "cpu_s": cpu, "server_cpu_s": server, "load_average_1min": load}


def _last_run(workspace: Path) -> dict:
    """The last line of the workspace's runs list; RuntimeError unless every stage but the crawl was Cached."""
    entry = json.loads((workspace / "runs.jsonl").read_text(encoding="utf-8").splitlines()[-1])
    states = entry["states"]
    if states.pop("crawl", None) != "Completed" or set(states.values()) != {"Cached"}:
        raise RuntimeError(f"the run was meant to find every stage cached: {entry['states']}")
    return entry


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def kept_up_server(env: dict[str, str]) -> Iterator[int]:
    """`aidetect server start` on a free loopback port for the block (its PREFECT_HOME from env); the server's pid."""
    port = _free_port()
    subprocess.run([*CLI, "server", "start", "--port", str(port)], cwd=REPO, env=env, check=True, capture_output=True)
    try:
        record = json.loads((Path(env["PREFECT_HOME"]) / "aidetect-server.json").read_text(encoding="utf-8"))
        yield int(record["pid"])
    finally:
        subprocess.run([*CLI, "server", "stop"], cwd=REPO, env=env, check=True, capture_output=True)


def _summarise(samples: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Median of each figure per way of running."""
    return {
        name: {figure: round(statistics.median(s[figure] for s in runs), 2) for figure in runs[0]}
        for name, runs in samples.items()
    }


def measure_cached_run(root: Path, env: dict[str, str], repeats: int, persons: int) -> dict:
    """The all-cached `aidetect run`, plain and with a kept-up server, beside `python -c "import prefect"`."""
    config = cached_run_config(root, persons)
    run = [*CLI, "run", "--config", str(config)]
    plain_env = env | {"PREFECT_HOME": str(root / "home-plain")}
    kept_env = env | {"PREFECT_HOME": str(root / "home-kept-up")}
    log.info("all-cached run: a first run computes every stage ...")
    first = _timed_with_cpu(run, plain_env)
    ways = ["bare_import_prefect", "temporary_server", "kept_up_server"]
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in ways}
    in_flow: dict[str, list[float]] = {name: [] for name in ways[1:]}
    with kept_up_server(kept_env) as server_pid:
        for repeat in range(repeats):  # interleaved, so that load from other work hits every way alike
            log.info("all-cached run: repeat %d of %d", repeat + 1, repeats)
            samples["bare_import_prefect"].append(_timed_with_cpu(BARE_PREFECT, plain_env))
            samples["temporary_server"].append(_timed_with_cpu(run, plain_env))
            in_flow["temporary_server"].append(_last_run(root / "ws")["seconds"])
            samples["kept_up_server"].append(_timed_with_cpu(run, kept_env, server_pid))
            in_flow["kept_up_server"].append(_last_run(root / "ws")["seconds"])
    median = _summarise(samples)
    bare = median["bare_import_prefect"]["wall_s"]
    return {
        "persons_per_class": persons,
        "repeats": repeats,
        "first_run_computing_every_stage_s": round(first["wall_s"], 1),
        "median": median,
        "in_flow_s": {name: round(statistics.median(values), 2) for name, values in in_flow.items()},
        "wall_ratio_to_bare_import_prefect": {name: round(median[name]["wall_s"] / bare, 2) for name in in_flow},
        "targets_s_on_an_idle_2_core_machine": CACHED_RUN_TARGETS_S,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=None, help="runs per command, the median kept (5; --quick 1)")
    parser.add_argument("--quick", action="store_true", help="one run per command: checks the script, in seconds")
    parser.add_argument("--skip-cached-run", action="store_true", help="leave out the all-cached `aidetect run`")
    parser.add_argument("--persons", type=int, default=8, help="synthetic persons per class of the cached run's data")
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
        cached_run = None if args.skip_cached_run else measure_cached_run(root, env, min(args.repeats, 3), args.persons)
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
    if cached_run is not None:
        result["all_cached_run"] = cached_run
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
