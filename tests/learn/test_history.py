"""Tests for pipeline_lib.learn.history: the epoch line and the learning curves."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from pipeline_lib.learn.history import EpochStats, curve_marks, describe_epoch, plot_learning_curves, seconds_left


def test_plot_learning_curves(tmp_path: Path) -> None:
    stats = [
        EpochStats(1, "head", 0.7, 0.5, 0.69, 0.5, 0.01, 1.0, 10.0),
        EpochStats(2, "head", 0.6, 0.7, 0.50, 0.75, 0.01, 1.0, 10.0),
        EpochStats(3, "all", 0.4, 0.9, 0.55, 0.75, 0.01, 1.0, 10.0),
    ]
    assert curve_marks(stats) == (3, 2)
    path = plot_learning_curves(stats, tmp_path / "plots" / "curves.png")
    assert path == tmp_path / "plots" / "curves.png"
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (1000, 400)
    assert [p.name for p in path.parent.iterdir()] == ["curves.png"]  # no temporary left behind
    as_dicts = [vars(e) for e in stats[::-1]]  # what the train task hands on; order does not matter
    assert curve_marks(as_dicts) == (3, 2)
    assert plot_learning_curves(as_dicts, tmp_path / "d.png").stat().st_size > 1000
    assert curve_marks([vars(e) | {"phase": "all"} for e in stats]) == (None, 2)
    with pytest.raises(ValueError, match="empty"):
        plot_learning_curves([], tmp_path / "e.png")
    with pytest.raises(ValueError, match="val_loss"):
        plot_learning_curves([{"epoch": 1, "phase": "all"}], tmp_path / "e.png")
    assert not (tmp_path / "e.png").exists()


def test_epoch_line_says_phase_losses_speed_and_time_left():
    stats = EpochStats(3, "all", 0.51234, 0.78, 0.43, 0.84, 0.01, 2.0, 412.3)
    left = seconds_left([4.0, 2.0, 3.0], epoch=3, max_epochs=30)
    assert left == 81.0
    line = describe_epoch(stats, 30, left)
    assert line.startswith("epoch 3/30 [all layers]  train loss 0.512 acc 0.780  |  val loss 0.430 acc 0.840")
    assert "412 img/s" in line and "at most 1:21 left" in line
    assert describe_epoch(stats, 3, seconds_left([2.0], 3, 3)).endswith("last epoch")
