"""Whether two models can be compared on a test split: neither may have trained on its images."""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd

from pipeline_lib.core.catalog import STATUS_OK

TRAINING_SPLITS: tuple[str, ...] = ("train", "val")


def seen_in_training(catalog: pd.DataFrame) -> set[str]:
    """The sha256 of the usable images a model was trained or early-stopped on (its split snapshot's train and val)."""
    rows = catalog[(catalog["status"] == STATUS_OK) & catalog["split"].isin(TRAINING_SPLITS)]
    return set(rows["sha256"].astype(str))


def overlap_reason(test_images: Iterable[str], seen: set[str], version: str) -> str | None:
    """'not comparable: ...' when some test images were in the training or validation data of version; else None."""
    test = set(map(str, test_images))
    shared = test & seen
    if not shared:
        return None
    return (
        f"not comparable: {len(shared)} of the {len(test)} test images were in the training or validation data of "
        f"version {version} (e.g. after --reshuffle), so its score on them says nothing"
    )
