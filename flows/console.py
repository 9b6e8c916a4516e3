"""What an `aidetect` command shows, and the log file in the workspace that keeps the rest.

stdout: the command's own lines: one per stage as it ends (computed or cached, and its time), one per training
epoch, and the summary. stderr: aidetect's warnings and errors, the errors of the libraries, and progress bars
when it is a terminal. Prefect's task-run states, MLflow's INFO lines, the plain progress lines of long loops and
the warnings of libraries that a user cannot act on are left off the console; --verbose (AIDETECT_VERBOSE=1) shows
them on stderr. The log file, <workspace>/logs/<time>-<command>.log, keeps every record of aidetect, Prefect and
MLflow at INFO and above, and every warning; it is written once the workspace exists (a command that fails before
its workspace is made leaves no folder behind).

Prefect's logging stays Prefect's: its console handler gets a filter, its API handler is left alone, so the flow's
records (its stage and epoch lines included) reach the run's logs in the Prefect UI as before.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator, MutableMapping
from datetime import datetime
from pathlib import Path
from typing import TextIO

from pipeline_lib.core.layout import MARKER_FILE
from pipeline_lib.core.output import is_output

VERBOSE_ENV = "AIDETECT_VERBOSE"  # set by --verbose (or by the user): the console shows every record
OWN_LOGGERS = ("flows", "tasks", "pipeline_lib", "prefect.flow_runs", "prefect.task_runs")  # aidetect's own records
AT_INFO = ("flows", "tasks", "pipeline_lib", "mlflow")  # loggers whose INFO records the log file keeps
# the loggers MLflow gives a stderr handler of its own (and propagate=False) when it configures logging at import
MLFLOW_OWNED = ("mlflow", "sqlalchemy.engine", "alembic", "huey")
LOGS_KEPT = 30  # log files kept per workspace (the oldest go)
EARLY_KEPT = 10_000  # records kept in memory until the workspace exists (then written to its log file)
FILE_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
CONSOLE_FORMAT = "%(levelname)s %(name)s: %(message)s"  # where Prefect's console handler is not set up (predict)


def library_defaults(terminal: bool) -> dict[str, str]:
    """Environment defaults for the libraries, to hold before MLflow is imported: MLflow's loggers left to the
    command's handlers instead of its own stderr handler, its progress bars only on a terminal."""
    defaults = {"MLFLOW_CONFIGURE_LOGGING": "false"}
    if not terminal:
        defaults["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    return defaults


def prefect_defaults() -> dict[str, str]:
    """Prefect's console handler at WARNING unless --verbose, through Prefect's logging settings: to hold before
    Prefect is imported (it then also quiets its records after the command's block, e.g. its temporary server
    stopping at exit)."""
    return {} if verbose() else {"PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "WARNING"}


@contextlib.contextmanager
def env_defaults(environ: MutableMapping[str, str], values: dict[str, str]) -> Iterator[None]:
    """values set in environ for the block where environ has none (a value the user set wins), removed after."""
    added = [name for name in values if name not in environ]
    for name in added:
        environ[name] = values[name]
    try:
        yield
    finally:
        for name in added:
            environ.pop(name, None)


def verbose() -> bool:
    """Whether the console shows every record (--verbose or AIDETECT_VERBOSE=1)."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def _own(name: str) -> bool:
    return any(name == prefix or name.startswith(f"{prefix}.") for prefix in OWN_LOGGERS)


class _Output(logging.Filter):
    """Passes the lines of the command's output only (pipeline_lib.core.output)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return is_output(record)


class QuietConsole(logging.Filter):
    """The log console (stderr): never the output lines (stdout has them); unless verbose, only aidetect's warnings
    and errors and the errors of libraries."""

    def __init__(self, show_all: bool) -> None:
        super().__init__()
        self.show_all = show_all

    def filter(self, record: logging.LogRecord) -> bool:
        if is_output(record):
            return False
        if self.show_all or record.levelno >= logging.ERROR:
            return True
        return record.levelno >= logging.WARNING and _own(record.name)


class _WorkspaceLog(logging.FileHandler):
    """The command's log file, written once its workspace exists (a new workspace is made by the flow, and a command
    that fails before that leaves no folder behind); the records before that wait in memory (at most EARLY_KEPT)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, encoding="utf-8", delay=True)
        self.setFormatter(logging.Formatter(FILE_FORMAT))
        self._marker = Path(path).parent.parent / MARKER_FILE
        self._early: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if self.stream is None and not self._marker.is_file():
            if len(self._early) < EARLY_KEPT:
                self._early.append(record)
            return
        early, self._early = self._early, []
        for kept in [*early, record]:
            super().emit(kept)

    def _open(self):  # noqa: ANN202 - logging.FileHandler's own hook
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()


def log_path(workspace: Path, command: str, now: datetime) -> Path:
    """<workspace>/logs/<YYYYmmdd-HHMMSS>-<command>.log."""
    return Path(workspace) / "logs" / f"{now:%Y%m%d-%H%M%S}-{command}.log"


def prune_logs(folder: Path, keep: int = LOGS_KEPT) -> list[Path]:
    """Delete all but the newest keep log files of a workspace's logs folder (names sort by time); those deleted."""
    old = sorted(folder.glob("*.log"))[:-keep] if keep > 0 else sorted(folder.glob("*.log"))
    for path in old:
        path.unlink(missing_ok=True)
    return old


def _consoles(root: logging.Logger) -> list[logging.Handler]:
    """Prefect's console handlers on the root logger (none where Prefect is not imported)."""
    if "prefect.logging.handlers" not in sys.modules:
        return []
    from prefect.logging.handlers import PrefectConsoleHandler

    return [handler for handler in root.handlers if isinstance(handler, PrefectConsoleHandler)]


@contextlib.contextmanager
def command_output(log_file: Path | None = None, lines: TextIO | None = None) -> Iterator[None]:
    """For the block: output lines on lines (default stdout; stderr where stdout carries a result such as JSON), a
    quiet log console (all of it with --verbose) and, when log_file is given, every record at INFO there. Enter it
    once Prefect has set up logging, if the command uses Prefect."""
    root = logging.getLogger()
    with contextlib.ExitStack() as stack:
        consoles = _consoles(root)
        if not consoles:
            consoles = [_stderr_handler()]
            stack.enter_context(_attached(root, consoles[0]))
        quiet = QuietConsole(verbose())
        for handler in consoles:
            stack.enter_context(_filtered(handler, quiet))
        output = logging.StreamHandler(lines or sys.stdout)
        output.setFormatter(logging.Formatter("%(message)s"))
        output.addFilter(_Output())
        stack.enter_context(_attached(root, output))
        if log_file is not None:
            if log_file.parent.is_dir():
                prune_logs(log_file.parent, LOGS_KEPT - 1)
            stack.enter_context(_attached(root, _WorkspaceLog(log_file)))
        for name in MLFLOW_OWNED:
            stack.enter_context(_handed_over(logging.getLogger(name)))
        for name in AT_INFO:
            stack.enter_context(_at_most(logging.getLogger(name), logging.INFO))
        stack.enter_context(_warnings_logged())
        yield


def _stderr_handler() -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(CONSOLE_FORMAT))
    return handler


@contextlib.contextmanager
def _attached(logger: logging.Logger, handler: logging.Handler) -> Iterator[None]:
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()


@contextlib.contextmanager
def _filtered(handler: logging.Handler, quiet: logging.Filter) -> Iterator[None]:
    handler.addFilter(quiet)
    try:
        yield
    finally:
        handler.removeFilter(quiet)


@contextlib.contextmanager
def _handed_over(logger: logging.Logger) -> Iterator[None]:
    """A logger that MLflow configured at import (its own stderr handler, not propagating) passes its records to
    the command's handlers for the block instead; one left as it is (propagating) stays so."""
    handlers, propagate = list(logger.handlers), logger.propagate
    if not propagate:
        logger.handlers, logger.propagate = [], True
    try:
        yield
    finally:
        logger.handlers, logger.propagate = handlers, propagate


@contextlib.contextmanager
def _at_most(logger: logging.Logger, level: int) -> Iterator[None]:
    """The logger lets records of level and above through for the block (a lower level already set stays)."""
    before = logger.level
    if logger.getEffectiveLevel() > level:
        logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)


@contextlib.contextmanager
def _warnings_logged() -> Iterator[None]:
    """Python warnings become records of the py.warnings logger (the log file keeps them, the quiet console not)."""
    logging.captureWarnings(True)
    try:
        yield
    finally:
        logging.captureWarnings(False)
