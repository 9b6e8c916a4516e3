"""Fixtures of the acquire tests: the demo's synthetic search site data."""

from __future__ import annotations

import pytest

from pipeline_lib.ops.demo_data import DemoDataset, generate_demo_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> DemoDataset:
    return generate_demo_dataset(tmp_path_factory.mktemp("demo") / "data", n_persons_per_class=3, image_size=48)
