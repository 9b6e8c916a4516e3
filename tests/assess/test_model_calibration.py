"""A model's calibration (temperature, normalisation policy) and its JSON form (assess/model_calibration.py)."""

from __future__ import annotations

import json

import pytest

from pipeline_lib.assess.model_calibration import ModelCalibration, parse_calibration
from pipeline_lib.core.config import NormalizeConfig


def test_the_json_form_reads_back_the_same() -> None:
    calibration = ModelCalibration(1.7, NormalizeConfig(mode="jpeg", quality=80), {"ece": 0.04})
    assert parse_calibration(json.dumps(calibration.as_dict()), "tag") == calibration
    assert parse_calibration(json.dumps(ModelCalibration().as_dict()), "tag") == ModelCalibration(1.0, None, {})


@pytest.mark.parametrize(
    "text",
    ['{"normalize": null}', '{"temperature": "warm"}', "[1]", "{", '{"temperature": 1e12}', '{"temperature": 0}'],
)
def test_a_malformed_calibration_names_where_it_came_from(text: str) -> None:
    with pytest.raises(ValueError, match="champion tag"):
        parse_calibration(text, "champion tag")
