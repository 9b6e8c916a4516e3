"""`aidetect` usage errors and --help: answered by click before anything heavy is imported, every option explained,
nothing cut off or cluttered at 80 columns. (How fast: benchmarks/bench_cli.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import typer.main
from typer.testing import CliRunner

from flows.cli import app

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "torchvision", "mlflow", "prefect", "sklearn")
USAGE_ERRORS = [
    ["no-such-command"],
    ["demo", "--persons", "2"],
    ["demo", "--no-such-option"],
    ["review", "done", "--no-such-option"],
    ["predict"],
    ["import", "some-folder"],  # --label missing
    ["--no-such-option"],
]
# Runs each command line in this one process, in turn, and records its exit code and the heavy modules loaded so far.
PROBE = """
import json, sys
from flows.cli import main
cases, heavy, report = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
results = []
for args in cases:
    sys.argv = ["aidetect", *args]
    try:
        main()
        code = 0
    except SystemExit as done:
        code = done.code
    results.append({"args": args, "code": code, "loaded": [m for m in heavy if m in sys.modules]})
with open(report, "w", encoding="utf-8") as handle:
    json.dump(results, handle)
"""


def commands(command: click.Command, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    """Every command and group under command, with the words that name it."""
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from commands(sub, (*path, name))


def test_usage_errors_and_help_import_neither_torch_mlflow_prefect_nor_sklearn(tmp_path: Path):
    helps = [[*path, "--help"] for path, _ in commands(typer.main.get_command(app))]
    report = tmp_path / "report.json"
    cases = [*USAGE_ERRORS, *helps]
    probe = [sys.executable, "-c", PROBE, json.dumps(cases), json.dumps(HEAVY), str(report)]
    done = subprocess.run(probe, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0 and report.is_file(), done.stderr[-3000:]
    results = json.loads(report.read_text(encoding="utf-8"))
    assert len(results) == len(cases) > len(USAGE_ERRORS) + 15, results
    for result in results:
        expected = 0 if result["args"][-1] == "--help" else 2
        assert result["code"] == expected, f"{result['args']} exited {result['code']}: {done.stderr[-2000:]}"
        assert not result["loaded"], f"`aidetect {' '.join(result['args'])}` imported {result['loaded']}"
    assert "Traceback" not in done.stderr and "No such command 'no-such-command'" in done.stderr, done.stderr


def test_every_option_and_argument_has_help_text():
    missing = [
        f"{' '.join(path) or 'aidetect'} {param.name}"
        for path, command in commands(typer.main.get_command(app))
        for param in command.params
        if not getattr(param, "help", None)
    ]
    assert not missing, f"options or arguments without help text: {missing}"


def test_help_of_every_command_at_80_columns_names_every_option_in_full_without_clutter():
    runner = CliRunner()
    for path, command in commands(typer.main.get_command(app)):
        result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "80"})
        shown = f"`aidetect {' '.join(path)} --help`"
        assert result.exit_code == 0, f"{shown}: {result.output}"
        text = result.output
        names = [name for param in command.params for name in (*param.opts, *param.secondary_opts) if "-" in name[:1]]
        assert all(name in text for name in names), f"{shown} lacks {[n for n in names if n not in text]}:\n{text}"
        assert "<bool>" not in text and "…" not in text, f"{shown} shows <bool> or cuts text off:\n{text}"
        listed = text.split("Commands:")[-1].splitlines() if "Commands:" in text else []
        assert not any(line.rstrip().endswith("...") for line in listed), f"{shown} cuts a command's help:\n{text}"
        too_wide = [line for line in text.splitlines() if len(line) > 80]
        assert not too_wide, f"{shown} is wider than 80 columns: {too_wide}"
