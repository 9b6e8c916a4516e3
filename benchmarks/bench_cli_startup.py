"""Benchmark: the fixed cost of one `aidetect` command, with Prefect's temporary server and with a running one.

Each measured call is `aidetect crawl` on a config whose only source is a folder of 2 small images, into a
workspace (one per mode) warmed up by one untimed call, so that every call does the same small, cached work: the
rest is fixed cost.
The calls alternate, --repeats times each, between:

- temporary: no PREFECT_API_URL and no server kept up (its own PREFECT_HOME): the command starts Prefect's
  temporary server and stops it at the end;
- running: another PREFECT_HOME, where `aidetect server start` keeps a server up (its start-up is timed once).

Also timed: a bare `python -c "import flows.cli"` (interpreter + CLI module). A call that fails (Prefect's
temporary server can fail to start on a loaded machine: "database is locked") is reported in
`failed_calls_run_again` and run again. Medians are printed as one JSON object on stdout; progress goes to stderr.
--quick: one call per mode, no warm-up calls, one workspace (created by the temporary mode's call, which the running
mode's call then finds cached): checks the script.
Usage: .venv/bin/python benchmarks/bench_cli_startup.py [--repeats 3] [--port 4299] [--quick]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

log = logging.getLogger("bench_cli_startup")
REPOSITORY = Path(__file__).resolve().parents[1]
AIDETECT = str(Path(sys.executable).parent / "aidetect")
ATTEMPTS = 5  # a failed call is run again up to 4 more times (and reported)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def environment(home: Path) -> dict[str, str]:
    """This environment without PREFECT_API_URL or an MLflow URI, with its own Prefect home."""
    removed = {"PREFECT_API_URL", "MLFLOW_TRACKING_URI"}
    return {k: v for k, v in os.environ.items() if k not in removed} | {"PREFECT_HOME": str(home)}


def run(command: list[str], env: dict[str, str], failures: list[str] | None = None) -> float:
    """Wall seconds of command. A failed call is noted in failures and run again (ATTEMPTS in all), or
    RuntimeError with its output when failures is None or it keeps failing."""
    for attempt in range(ATTEMPTS):
        start = time.perf_counter()
        result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPOSITORY)
        seconds = time.perf_counter() - start
        if result.returncode == 0:
            return seconds
        errors = [line for line in result.stderr.splitlines() if "Error" in line] or [f"exit {result.returncode}"]
        last = errors[-1].strip()
        if failures is None or attempt == ATTEMPTS - 1:
            raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr[-3000:]}")
        failures.append(f"{command[1]}: {last[:300]}")
        log.warning("call failed after %.1f s (%s); again", seconds, last[:200])
    raise AssertionError("unreachable")


def make_config(root: Path) -> Path:
    """A config whose only source is a folder of 2 small images."""
    for index in range(2):
        folder = root / "images" / "prompt-a"
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (64, 64), (40 * index, 90, 200)).save(folder / f"{index}.png")
    config = root / "config.yaml"
    config.write_text(f"sources:\n  folders:\n    - path: {root / 'images'}\n      label: ai\n", encoding="utf-8")
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per mode, median kept (3; --quick 1)")
    parser.add_argument("--port", type=int, default=None, help="port of the kept-up server (default: a free one)")
    parser.add_argument("--quick", action="store_true", help="one call per mode, no warm-up: checks the script")
    args = parser.parse_args()
    args.repeats = args.repeats or (1 if args.quick else 3)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = make_config(root)
        temporary_env, running_env = environment(root / "home-temporary"), environment(root / "home-running")
        failures: dict[str, list[str]] = {"temporary": [], "running": []}
        crawl = [AIDETECT, "crawl", "--config", str(config), "--workspace"]  # each mode its own workspace (not --quick)
        workspaces = {mode: str(root / ("ws-temporary" if args.quick else f"ws-{mode}")) for mode in failures}
        import_s = statistics.median(
            run([sys.executable, "-c", "import flows.cli"], temporary_env) for _ in range(args.repeats)
        )
        port = args.port or free_port()
        server_start_s = run([AIDETECT, "server", "start", "--port", str(port), "--timeout", "600"], running_env)
        log.info("aidetect server start: %.1f s", server_start_s)
        temporary, running = [], []
        try:
            if not args.quick:
                log.info("warm-up calls (create the workspaces and their MLflow databases) ...")
                run([*crawl, workspaces["temporary"]], temporary_env, failures["temporary"])
                run([*crawl, workspaces["running"]], running_env, failures["running"])
            for _ in range(args.repeats):
                temporary.append(run([*crawl, workspaces["temporary"]], temporary_env, failures["temporary"]))
                running.append(run([*crawl, workspaces["running"]], running_env, failures["running"]))
                log.info("temporary server %.1f s, running server %.1f s", temporary[-1], running[-1])
        finally:
            run([AIDETECT, "server", "stop"], running_env)
    temporary_s, running_s = statistics.median(temporary), statistics.median(running)
    print(
        json.dumps(
            {
                "benchmark": "cli_startup",
                "command": "aidetect crawl (2 cached images)",
                "quick": args.quick,
                "repeats": args.repeats,
                "cpu_count": os.cpu_count(),
                "load_average_at_end": round(os.getloadavg()[0], 2),
                "python_import_cli_s": round(import_s, 2),
                "temporary_server_command_s": round(temporary_s, 2),
                "running_server_command_s": round(running_s, 2),
                "saved_per_command_s": round(temporary_s - running_s, 2),
                "temporary_vs_running": round(temporary_s / running_s, 2),
                "server_start_once_s": round(server_start_s, 2),
                "temporary_server_runs_s": [round(s, 2) for s in temporary],
                "running_server_runs_s": [round(s, 2) for s in running],
                "failed_calls_run_again": failures,
            }
        )
    )


if __name__ == "__main__":
    main()
