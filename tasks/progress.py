"""Training progress as each epoch ends: a line of output (Prefect's run logger) and the epoch's metrics in MLflow."""

from __future__ import annotations

import dataclasses
import logging

from prefect import get_run_logger

from pipeline_lib.core.output import output_line
from pipeline_lib.core.tracking.runs import Tracker, epoch_metrics
from pipeline_lib.learn.history import EpochStats, describe_epoch, seconds_left

log = logging.getLogger(__name__)


class EpochReporter:
    """The on_epoch callback of train_model: says how the epoch went and logs its numbers to the tracker's run."""

    def __init__(self, tracker: Tracker | None, max_epochs: int) -> None:
        self.tracker = tracker
        self.max_epochs = max_epochs
        self.durations: list[float] = []

    def __call__(self, stats: EpochStats) -> None:
        self.durations.append(stats.seconds)
        left = seconds_left(self.durations, stats.epoch, self.max_epochs)
        get_run_logger().info(describe_epoch(stats, self.max_epochs, left), extra=output_line())
        if self.tracker is None:
            return
        try:
            self.tracker.log_metrics(epoch_metrics(dataclasses.asdict(stats)), step=stats.epoch)
        except Exception as error:  # a tracking store that is down must not stop training
            log.warning("epoch %d not logged to MLflow: %s", stats.epoch, error)
