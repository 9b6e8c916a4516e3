"""Shared by the assess tests: a tiny classifier and random uint8 images."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import TinyClassifier


@pytest.fixture(scope="module")
def model() -> TinyClassifier:
    torch.manual_seed(0)
    return TinyClassifier().eval()


def random_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator)
