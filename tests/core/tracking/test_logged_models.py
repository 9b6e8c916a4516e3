"""Logged models' files: real MLflow on SQLite in tmp_path, tiny torch models."""

import tempfile

import numpy as np
import pytest
import torch
from torch import nn

from pipeline_lib.core.tracking.logged_models import (
    IMAGE_SIZE_TAG,
    STATE_DICT_PATH,
    ModelNotFoundError,
    downloaded_state_dict,
    load_pickled,
    log_pytorch_model,
    logged_model_of_run,
)
from pipeline_lib.core.tracking.runs import start_run
from pipeline_lib.core.tracking.store import tracking_uri


def _tracker(workspace):
    return start_run(tracking_uri(None, workspace), "exp", workspace, "run", {"aidetect.kind": "pipeline"})


def _tiny() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 2))


@pytest.fixture
def temp_folder(tmp_path, monkeypatch):
    """The folder tempfile uses in this test, to see what is left in it."""
    folder = tmp_path / "temp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def test_a_logged_model_carries_its_checkpoint_file_and_leaves_no_temporary_copy(workspace, tmp_path, temp_folder):
    checkpoint = tmp_path / "epoch-7.pt"
    checkpoint.write_bytes(b"aidetect checkpoint bytes")
    tracker = _tracker(workspace)
    example = np.random.rand(1, 3, 4, 4).astype("float32")
    with_file = log_pytorch_model(tracker, _tiny(), example, ["torch"], checkpoint=checkpoint)
    without = log_pytorch_model(_tracker(workspace), _tiny(), example, ["torch"])
    with downloaded_state_dict(tracker.uri, with_file) as found:
        assert found is not None and found.name == "best.pt", f"{STATE_DICT_PATH} not found: {found}"
        assert found.read_bytes() == checkpoint.read_bytes()
    assert not found.exists(), "the downloaded checkpoint should be removed when the with block ends"
    with downloaded_state_dict(tracker.uri, without) as missing:
        assert missing is None
    left = sorted(p.name for p in temp_folder.glob("aidetect-*"))
    assert not left, f"temporary copies of checkpoints left behind: {left}"


def test_the_model_of_a_run_and_its_image_size(workspace):
    tracker = _tracker(workspace)
    model_uri = log_pytorch_model(tracker, _tiny(), np.random.rand(1, 3, 4, 4).astype("float32"), ["torch"])
    assert logged_model_of_run(tracker.uri, tracker.run_id) == (model_uri, None)
    tracker.set_tags({f"aidetect.{IMAGE_SIZE_TAG}": "4"})
    assert logged_model_of_run(tracker.uri, tracker.run_id) == (model_uri, 4)
    with pytest.raises(ModelNotFoundError, match="no MLflow run"):
        logged_model_of_run(tracker.uri, "0" * 32)
    with pytest.raises(ModelNotFoundError, match="logged no model"):
        logged_model_of_run(tracker.uri, _tracker(workspace).run_id)


def test_a_pickled_model_loads_only_when_asked_and_accepts_any_batch_size(workspace, temp_folder):
    model = _tiny()
    tracker = _tracker(workspace)
    model_uri = log_pytorch_model(tracker, model, np.random.rand(1, 3, 4, 4).astype("float32"), ["torch"])
    loaded, size = load_pickled(tracker.uri, model_uri, None, "test model")
    assert size == 4, f"the image size should come from the signature, got {size}"
    images = torch.rand(5, 3, 4, 4)
    assert loaded(images).shape == (5, 2), "pickled model must accept any batch size"
    torch.testing.assert_close(loaded(images), model(images))
    assert load_pickled(tracker.uri, model_uri, 9, "test model")[1] == 9, "a recorded size wins over the signature"
    left = sorted(p.name for p in temp_folder.rglob("*.pth"))
    assert not left, f"downloaded model files left behind: {left}"


def test_a_pickled_model_file_that_holds_no_model_is_named_not_called(workspace):
    tracker = _tracker(workspace)
    model_uri = log_pytorch_model(tracker, _tiny(), np.random.rand(1, 3, 4, 4).astype("float32"), ["torch"])
    (pickled,) = (workspace.root / "mlartifacts").rglob("model.pth")
    torch.save(5, pickled)  # replaced by hand: a number where the model was
    why = "holds no torch model \\(AttributeError: 'int' object has no attribute 'eval'\\)"
    with pytest.raises(ModelNotFoundError, match=why):
        load_pickled(tracker.uri, model_uri, 4, "champion of 'aidetect'")
