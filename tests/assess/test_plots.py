"""Tests for pipeline_lib.assess.plots: every evaluation plot is a valid PNG, written atomically."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from pipeline_lib.assess.plots import plot_confusion_matrix, plot_pr, plot_reliability, plot_roc


@pytest.mark.parametrize("plot", [plot_confusion_matrix, plot_roc, plot_pr, plot_reliability])
@pytest.mark.parametrize("single_class", [False, True])
def test_plots_are_valid_pngs(plot, single_class: bool, hand_predictions: pd.DataFrame, tmp_path: Path) -> None:
    predictions = hand_predictions.head(5) if single_class else hand_predictions
    target = tmp_path / "plots" / f"{plot.__name__}.png"
    returned = plot(predictions, target)
    assert Path(returned) == target, f"{plot.__name__} returned {returned}, expected {target}"
    with Image.open(target) as image:
        image.verify()
        assert image.format == "PNG", f"{plot.__name__} wrote {image.format}, not PNG"
    leftovers = [p.name for p in target.parent.iterdir() if p != target]
    assert leftovers == [], f"atomic write left temporary files behind: {leftovers}"
