"""flows.console: output lines on stdout, a quiet log console (all of it with --verbose), everything in the log file."""

from __future__ import annotations

import io
import logging
import warnings
from datetime import datetime
from pathlib import Path

import pytest

from flows import console
from pipeline_lib.core.output import output_line
from pipeline_lib.core.workspace import Workspace


@pytest.fixture
def own_console(monkeypatch: pytest.MonkeyPatch) -> None:
    """No Prefect console handler on the root logger (another test's Prefect harness may have set one up, writing to
    a stream bound before capfd): command_output then writes its quiet console to this test's stderr."""
    from prefect.logging.handlers import PrefectConsoleHandler

    root = logging.getLogger()
    kept = [handler for handler in root.handlers if not isinstance(handler, PrefectConsoleHandler)]
    monkeypatch.setattr(root, "handlers", kept)


def _record(name: str, level: int, extra: dict[str, bool] | None = None) -> logging.LogRecord:
    record = logging.LogRecord(name, level, __file__, 1, "message", None, None)
    record.__dict__.update(extra or {})
    return record


def test_the_quiet_console_shows_aidetects_warnings_and_every_error_only() -> None:
    quiet, verbose = console.QuietConsole(show_all=False), console.QuietConsole(show_all=True)
    shown = [
        _record("tasks.stages", logging.WARNING),
        _record("pipeline_lib.acquire.crawl", logging.WARNING),
        _record("prefect.flow_runs", logging.WARNING),
        _record("mlflow.store", logging.ERROR),
    ]
    hidden = [
        _record("prefect.task_runs", logging.INFO),  # "Finished in state Completed()"
        _record("mlflow.store.db.utils", logging.INFO),
        _record("mlflow.pytorch", logging.WARNING),  # the long pickle warning
        _record("py.warnings", logging.WARNING),
        _record("pipeline_lib.core.progress", logging.INFO),
        _record("flowsy", logging.WARNING),  # not aidetect's logger "flows"
    ]
    output = _record("prefect.task_runs", logging.INFO, output_line())
    assert all(quiet.filter(r) for r in shown), [r.name for r in shown if not quiet.filter(r)]
    assert not any(quiet.filter(r) for r in hidden), [r.name for r in hidden if quiet.filter(r)]
    assert all(verbose.filter(r) for r in shown + hidden), "--verbose shows every record"
    assert not quiet.filter(output) and not verbose.filter(output), "an output line is on stdout, never twice"


def test_command_output_prints_output_lines_and_keeps_everything_in_the_log_file(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], own_console: None
) -> None:
    log_file = console.log_path(tmp_path / "ws", "run", datetime(2026, 1, 2, 3, 4, 5))
    assert log_file == tmp_path / "ws" / "logs" / "20260102-030405-run.log"
    Workspace.create(tmp_path / "ws")
    root = logging.getLogger()
    handlers, level = list(root.handlers), logging.getLogger("mlflow").level
    with console.command_output(log_file):
        logging.getLogger("flows.pipeline").info("train        computed   41.4 s", extra=output_line())
        logging.getLogger("pipeline_lib.learn.train").info("an info line of aidetect")
        logging.getLogger("mlflow.store.db.utils").info("Creating initial MLflow database tables...")
        logging.getLogger("mlflow.pytorch").warning("Saving pytorch model by Pickle")
        logging.getLogger("tasks.stages").warning("format-shortcut audit [warn]")
        warnings.warn("a library's own warning", UserWarning, stacklevel=1)
    out, err = capfd.readouterr()
    assert out == "train        computed   41.4 s\n", f"stdout must carry the output lines only: {out!r}"
    assert "format-shortcut audit" in err, f"aidetect's own warning belongs on stderr: {err!r}"
    for noise in ("an info line", "Creating initial", "Pickle", "own warning", "computed"):
        assert noise not in err, f"{noise!r} must stay off the quiet console: {err!r}"
    kept = log_file.read_text(encoding="utf-8")
    for line in ("computed", "an info line", "Creating initial", "Pickle", "audit [warn]", "own warning"):
        assert line in kept, f"the log file must keep {line!r}: {kept}"
    assert root.handlers == handlers and logging.getLogger("mlflow").level == level, "the block changed logging"


def test_the_log_file_waits_for_its_workspace_and_a_command_that_made_none_leaves_no_folder(tmp_path: Path) -> None:
    never = console.log_path(tmp_path / "never", "run", datetime(2026, 1, 2, 3, 4, 5))
    with console.command_output(never):
        logging.getLogger("flows.cli").warning("failed before the workspace was made")
    assert not (tmp_path / "never").exists(), "a log file alone must not make a workspace folder"

    later = console.log_path(tmp_path / "ws", "run", datetime(2026, 1, 2, 3, 4, 5))
    with console.command_output(later):
        logging.getLogger("flows.pipeline").info("before the workspace")
        assert not (tmp_path / "ws").exists(), "nothing written before the workspace exists"
        Workspace.create(tmp_path / "ws")
        logging.getLogger("flows.pipeline").info("after the workspace")
    kept = later.read_text(encoding="utf-8").splitlines()
    assert [line.split(": ", 1)[1] for line in kept] == ["before the workspace", "after the workspace"], kept


def test_verbose_shows_every_record_on_stderr(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, own_console: None
) -> None:
    monkeypatch.setenv(console.VERBOSE_ENV, "1")
    with console.command_output():
        logging.getLogger("mlflow.store.db.utils").info("Creating initial MLflow database tables...")
        logging.getLogger("flows.pipeline").info("an output line", extra=output_line())
    out, err = capfd.readouterr()
    assert "Creating initial" in err and out == "an output line\n", (out, err)
    assert "an output line" not in err, "an output line is printed once, on stdout"


def test_prefects_console_handler_is_quieted_and_left_as_it_was(
    monkeypatch: pytest.MonkeyPatch, own_console: None
) -> None:
    from prefect.logging.handlers import PrefectConsoleHandler

    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    shown = io.StringIO()
    prefects = PrefectConsoleHandler(stream=shown)
    root, task_runs = logging.getLogger(), logging.getLogger("prefect.task_runs")
    level = task_runs.level
    root.addHandler(prefects)
    task_runs.setLevel(logging.INFO)  # as Prefect's logging setup sets it: its INFO records reach the handlers
    try:
        with console.command_output(lines=io.StringIO()):
            task_runs.info("Finished in state Completed()")
            logging.getLogger("tasks.stages").warning("format-shortcut audit [warn]")
        task_runs.info("after the command")
    finally:
        root.removeHandler(prefects)
        task_runs.setLevel(level)
    text = shown.getvalue()
    assert "format-shortcut audit" in text, f"aidetect's warnings stay on Prefect's console: {text!r}"
    assert "Finished in state" not in text, f"task-run states are off the console: {text!r}"
    assert "after the command" in text, "the quiet filter is taken off Prefect's handler after the command"


def test_only_the_newest_log_files_are_kept(tmp_path: Path) -> None:
    names = [f"2026010{day}-120000-run.log" for day in range(1, 6)]
    for name in names:
        (tmp_path / name).write_text("x", encoding="utf-8")
    removed = console.prune_logs(tmp_path, keep=3)
    assert [path.name for path in removed] == names[:2], removed
    assert sorted(path.name for path in tmp_path.iterdir()) == names[2:]


def test_environment_defaults_leave_a_users_choice_alone_and_go_after_the_block() -> None:
    environ = {"MLFLOW_CONFIGURE_LOGGING": "true"}
    with console.env_defaults(environ, console.library_defaults(terminal=False)):
        assert environ == {"MLFLOW_CONFIGURE_LOGGING": "true", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    assert environ == {"MLFLOW_CONFIGURE_LOGGING": "true"}, "a default must not outlive the command"
    assert console.library_defaults(terminal=True) == {"MLFLOW_CONFIGURE_LOGGING": "false"}, "bars on a terminal"


def test_prefects_console_is_quieted_through_its_settings_unless_verbose(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    assert console.prefect_defaults() == {"PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "WARNING"}
    monkeypatch.setenv(console.VERBOSE_ENV, "1")
    assert console.prefect_defaults() == {}
