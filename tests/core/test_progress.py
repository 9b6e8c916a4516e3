"""Progress of long loops: plain lines when stderr is not a terminal, every item passed through unchanged."""

from __future__ import annotations

import logging

import pytest

from pipeline_lib.core import progress


def test_plain_lines_report_done_total_rate_and_time_left(monkeypatch: pytest.MonkeyPatch, caplog):
    monkeypatch.setattr(progress, "on_terminal", lambda: False)
    monkeypatch.setattr(progress, "LINE_EVERY_S", 0.0)  # a line after every item
    monkeypatch.setattr(progress, "QUIET_BELOW_S", 0.0)
    with caplog.at_level(logging.INFO, logger="pipeline_lib.core.progress"):
        assert list(progress.progress(range(0, 10, 4), 10, "scoring", step=4)) == [0, 4, 8]
    lines = [record.getMessage() for record in caplog.records]
    assert lines[0].startswith("scoring: 4/10 images (40%)") and "left" in lines[0]
    assert lines[-1].startswith("scoring: 10 images in "), lines  # the last step counts only what is left


def test_short_loops_stay_quiet_in_plain_mode(monkeypatch: pytest.MonkeyPatch, caplog):
    monkeypatch.setattr(progress, "on_terminal", lambda: False)
    with caplog.at_level(logging.INFO, logger="pipeline_lib.core.progress"):
        assert list(progress.progress(["a", "b"], 2, "hashing")) == ["a", "b"]
    assert not caplog.records


def test_describe_without_a_total():
    assert progress.describe(3, 0, "file", 1.5) == "3 files so far, 2.0/s"
    assert progress.describe(1, 1, "keyword", 2.0) == "1 keyword in 2.0 s (0.5/s)"
