"""Shared by the assess tests: a tiny classifier, random uint8 images and ten hand-made predictions."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline_lib.assess.evaluate import predictions_table
from tests.conftest import TinyClassifier


@pytest.fixture(scope="module")
def model() -> TinyClassifier:
    torch.manual_seed(0)
    return TinyClassifier().eval()


def random_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator)


# Ten hand-made predictions at threshold 0.5 (ai = positive):
#   ai   rows: 0.9 0.8 0.7 0.6 | 0.3        -> tp = 4, fn = 1
#   real rows: 0.65 0.55 | 0.2 0.1 0.05     -> fp = 2, tn = 3
AI_SCORES = [0.9, 0.8, 0.7, 0.6, 0.3]
REAL_SCORES = [0.65, 0.55, 0.2, 0.1, 0.05]


def make_rows(labels: list[str], groups: list[str] | None = None) -> pd.DataFrame:
    """Catalog-like test rows with the identity columns the evaluation needs."""
    n = len(labels)
    return pd.DataFrame(
        {
            "sha256": [f"{i:064x}" for i in range(n)],
            "group": groups or [f"person{i}" for i in range(n)],
            "label": labels,
            "source": ["search:bing"] * n,
            "url": [f"http://127.0.0.1/img{i}.jpg" for i in range(n)],
            "keyword": groups or [f"person{i}" for i in range(n)],
        }
    )


@pytest.fixture
def hand_predictions() -> pd.DataFrame:
    rows = make_rows(["ai"] * 5 + ["real"] * 5)
    return predictions_table(rows, np.array(AI_SCORES + REAL_SCORES), threshold=0.5)
