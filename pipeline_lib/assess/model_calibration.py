"""What scoring needs beside a model's weights (its temperature and the normalisation policy of its training), and
its JSON form: the calibration file beside a checkpoint (assess.predict) and a model version's tag (assess.registry).

A module of its own, light to import (no torch): a run whose model stages are cached still registers its model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from pipeline_lib.assess.calibration import check_temperature
from pipeline_lib.core.config import NormalizeConfig


@dataclass(frozen=True)
class ModelCalibration:
    """What scoring needs beside the weights: the temperature and the normalisation policy of training."""

    temperature: float = 1.0
    normalize: NormalizeConfig | None = None
    details: dict[str, Any] | None = None  # e.g. ece_raw, ece, n_val: informative only

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        policy = None if self.normalize is None else self.normalize.model_dump(mode="json")
        return {"temperature": self.temperature, "normalize": policy, **(self.details or {})}


def parse_calibration(text: str, where: str) -> ModelCalibration:
    """A ModelCalibration from its JSON text (a file beside a checkpoint, or a model version's tag)."""
    try:
        data = json.loads(text)
        temperature = float(data["temperature"])
        policy = data.get("normalize")
        normalize = None if policy is None else NormalizeConfig.model_validate(policy)
    except (OSError, ValueError, KeyError, TypeError, ValidationError) as error:
        raise ValueError(f"{where} is malformed: {error}") from None
    check_temperature(temperature, where)  # bounded like a fitted one: 1e-12 or 1e12 would make every p_ai 0/1 or 0.5
    details = {k: v for k, v in data.items() if k not in ("temperature", "normalize")}
    return ModelCalibration(temperature, normalize, details)
