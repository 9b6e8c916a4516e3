"""The registered model's versions, tags and aliases: real MLflow on SQLite in tmp_path."""

import numpy as np
import pytest
from torch import nn

from pipeline_lib.core.tracking.logged_models import ModelNotFoundError, log_pytorch_model
from pipeline_lib.core.tracking.runs import start_run
from pipeline_lib.core.tracking.store import tracking_uri
from pipeline_lib.core.tracking.versions import (
    champion_calibration,
    current_champion,
    find_version,
    register_version,
    run_calibration,
    set_alias,
    set_version_tags,
)


def _logged(workspace):
    tracker = start_run(tracking_uri(None, workspace), "exp", workspace, "run", {"aidetect.kind": "pipeline"})
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    return tracker, log_pytorch_model(tracker, model, np.random.rand(1, 3, 4, 4).astype("float32"), ["torch"])


def test_versions_are_found_by_digest_and_aliases_move_only_when_set(workspace):
    tracker, uri = _logged(workspace)
    first = register_version(tracker, uri, "det", {"model_digest": "m1", "calibration": '{"temperature": 2.0}'})
    second = register_version(tracker, uri, "det", {"model_digest": "m2"})
    assert (first, second) == ("1", "2")
    assert str(find_version(tracker.uri, "det", "m2").version) == second
    assert find_version(tracker.uri, "det", "nope") is None and find_version(tracker.uri, "other", "m1") is None
    assert current_champion(tracker.uri, "det") is None, "registering a version moved no alias"
    set_alias(tracker.uri, "det", "champion", first)
    set_version_tags(tracker.uri, "det", first, {"test_digest": "B"})
    holder = current_champion(tracker.uri, "det")
    assert str(holder.version) == first and holder.tags["test_digest"] == "B" and holder.tags["model_digest"] == "m1"
    assert champion_calibration(tracker.uri, "det") == '{"temperature": 2.0}'
    assert champion_calibration(tracker.uri, "det", "loo-x") is None and current_champion(tracker.uri, "x") is None


def test_a_runs_calibration_comes_from_its_tag_or_its_version(workspace):
    tracker, uri = _logged(workspace)
    assert run_calibration(tracker.uri, tracker.run_id) is None
    register_version(tracker, uri, "det", {"calibration": "from-version"})
    assert run_calibration(tracker.uri, tracker.run_id) == "from-version"
    tracker.set_tags({"aidetect.calibration": "from-run"})
    assert run_calibration(tracker.uri, tracker.run_id) == "from-run"
    with pytest.raises(ModelNotFoundError, match="no MLflow run"):
        run_calibration(tracker.uri, "0" * 32)
