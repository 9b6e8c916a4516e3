"""Tests for pipeline_lib.core.output: which log records are lines of a command's output."""

from __future__ import annotations

import logging

from pipeline_lib.core.output import is_output, output_line


def _record(name: str, extra: dict[str, bool] | None = None) -> logging.LogRecord:
    record = logging.LogRecord(name, logging.INFO, __file__, 1, "a line", None, None)
    record.__dict__.update(extra or {})
    return record


def test_a_record_is_output_only_when_logged_with_output_line() -> None:
    assert is_output(_record("prefect.task_runs", output_line())), "a record logged with output_line() is output"
    assert not is_output(_record("prefect.task_runs")), "an ordinary record is a log message, not output"
    assert not is_output(_record("pipeline_lib.core.progress")), "progress lines go to the log, not stdout"


def test_output_line_gives_a_new_dict_each_time() -> None:
    first = output_line()
    first.clear()
    assert output_line(), "a caller changing its extra must not change the next one's"
