"""Which log records are lines of a command's output (what a person running it reads), not log messages.

A flow or task logs such a line like any other record (so it reaches Prefect's API and the run's logs in its UI),
with `extra=output_line()`; the CLI prints the records that is_output accepts as plain lines on stdout and keeps
them off the log console.
"""

from __future__ import annotations

import logging

OUTPUT = "aidetect_output"  # the attribute that marks a record as a line of output


def output_line() -> dict[str, bool]:
    """The `extra` of a log record that is a line of the command's output (e.g. a stage's or an epoch's line)."""
    return {OUTPUT: True}


def is_output(record: logging.LogRecord) -> bool:
    """Whether a record is a line of output (it was logged with output_line())."""
    return bool(getattr(record, OUTPUT, False))
