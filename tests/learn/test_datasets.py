"""Tests for pipeline_lib.learn.datasets: the cached images, class balance, samplers and loaders (tiny PNGs, CPU)."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from pipeline_lib.core.workspace import Workspace
from pipeline_lib.learn import augment as augment_lib
from pipeline_lib.learn.datasets import CachedImages, UndersampledEpochSampler, class_balance, make_dataset, make_loader
from tests.learn.test_train import SIZE, _config, _dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Workspace, pd.DataFrame]:
    workspace = Workspace.create(tmp_path_factory.mktemp("datasets") / "ws")
    return workspace, _dataset(workspace)


def test_loader_options(data: tuple[Workspace, pd.DataFrame]) -> None:
    workspace, table = data
    rows = table[table["split"] == "train"].reset_index(drop=True)
    labels = [0] * len(rows)
    dataset = CachedImages(workspace, rows["sha256"].tolist(), labels, SIZE)
    cpu = make_loader(dataset, _config(), shuffle=True, device="cpu")
    assert not cpu.pin_memory and not cpu.persistent_workers
    pooled = make_loader(dataset, _config(num_workers=2), shuffle=False, device="cuda")
    assert pooled.pin_memory and pooled.persistent_workers and pooled.num_workers == 2
    sampler = cpu.sampler
    sampler.set_epoch(1)
    first = list(sampler)
    sampler.set_epoch(2)
    second = list(sampler)
    assert {key[0] for key in first} == {1} and sorted(i for _, i in first) == list(range(len(rows)))
    assert [i for _, i in first] != [i for _, i in second]
    sampler.set_epoch(1)
    assert list(sampler) == first


def test_class_balance_summary_and_undersampled_epochs() -> None:
    labels = [0] * 8 + [1] * 2
    assert class_balance(labels, "none").weights == {"real": 1.0, "ai": 1.0}
    weighted = class_balance(labels, "weighted")
    assert weighted.weights == {"real": 0.625, "ai": 2.5} and weighted.per_epoch == 10
    assert class_balance([0, 0, 1, 1], "weighted").weights == {"real": 1.0, "ai": 1.0}
    assert class_balance([0, 0, 0], "undersample").per_epoch == 3  # one class: nothing to balance
    with pytest.raises(ValueError, match="class_balance"):
        class_balance(labels, "oversample")
    sampler = UndersampledEpochSampler(labels, seed=0)
    epochs = []
    for epoch in (1, 2, 3):
        sampler.set_epoch(epoch)
        keys = list(sampler)
        assert len(keys) == len(sampler) == 4 and {e for e, _ in keys} == {epoch}
        drawn = [index for _, index in keys]
        assert sorted(i for i in drawn if i >= 8) == [8, 9], "every minority image, every epoch"
        assert len({i for i in drawn if i < 8}) == 2
        epochs.append(drawn)
    assert len({tuple(sorted(d)) for d in epochs}) > 1, "the majority subset should change between epochs"
    sampler.set_epoch(1)
    assert [index for _, index in sampler] == epochs[0], "the draw depends on (seed, epoch) only"


def test_device_augmentation_dataset_items(data: tuple[Workspace, pd.DataFrame]) -> None:
    workspace, table = data
    rows = table[table["split"] == "train"].reset_index(drop=True)
    config = _config()
    dataset = make_dataset(workspace, rows, config, augment=True, policy=None, on_device=True)
    image, label, params = dataset[(3, 0)]
    assert image.dtype == torch.uint8 and image.shape == (3, SIZE, SIZE) and params.shape == (9,)
    loader_set = make_dataset(workspace, rows, config, augment=True, policy=None)
    augmented, same_label = loader_set[(3, 0)]
    assert same_label == label and torch.equal(augment_lib.apply_params(image[None], params[None])[0], augmented)
    with pytest.raises(ValueError, match="not both"):
        CachedImages(workspace, [], [], SIZE, augment=lambda x: x, draw=lambda x: x)
