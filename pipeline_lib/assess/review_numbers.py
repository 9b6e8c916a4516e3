"""The review gate's numbers as the report shows them (kept apart from the queue's scoring code, so that the
report's cache key does not follow it)."""

from __future__ import annotations

from collections.abc import Mapping

REVIEW_METRICS = {  # the review gate's metrics (tasks.stages.review_gate) the report shows, with their meaning
    "review.pending": "images pending in the review queue",
    "review.suspects_shown": "suspects shown to a person (suspicion at or above review.suspicion_threshold)",
    "review.rejected": "images rejected",
    "review.approved_by_model": "images approved by the model (review.mode assisted)",
    "review.model_suspects_overturned": "suspects a person approved (the model's suspicion overturned)",
}


def review_rows(metrics: Mapping[str, float]) -> list[dict[str, str]]:
    """The report's review rows (what, how many) of the review metrics present; [] when the run had no gate."""
    return [
        {"name": name, "what": what, "value": f"{int(metrics[name])}"}
        for name, what in REVIEW_METRICS.items()
        if name in metrics
    ]
