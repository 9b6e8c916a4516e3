"""The classifier's heads: the recipe's Linear layer, and the probe head trained on frozen features.

A head is described by a small dict kept in each checkpoint's meta ("head"), so that a checkpoint rebuilds the
head it was trained with: {"kind": "linear"} (the default, and what checkpoints without the key hold) or
{"kind": "probe", "hidden": H, "dropout": p} (hidden 0: a linear probe).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

LINEAR: dict[str, Any] = {"kind": "linear"}
_SCALE_FLOOR = 1e-6  # a feature that never varies in training is scaled by this instead of 0


def probe_spec(head: str, hidden: int, dropout: float) -> dict[str, Any]:
    """The spec of a probe head from train.probe (head linear or mlp, its hidden width and dropout)."""
    if head not in ("linear", "mlp"):
        raise ValueError(f"train.probe.head must be linear or mlp, got {head!r}")
    return {"kind": "probe", "hidden": int(hidden) if head == "mlp" else 0, "dropout": float(dropout)}


def check_spec(spec: Mapping[str, Any] | None) -> dict[str, Any]:
    """A validated copy of a head spec (None: the Linear head); ValueError naming what is wrong."""
    if spec is None:
        return dict(LINEAR)
    kind = spec.get("kind")
    if kind == "linear" and set(spec) == {"kind"}:
        return dict(LINEAR)
    if kind == "probe" and set(spec) == {"kind", "hidden", "dropout"}:
        hidden, dropout = spec["hidden"], spec["dropout"]
        if isinstance(hidden, int) and hidden >= 0 and isinstance(dropout, int | float) and 0 <= dropout < 1:
            return {"kind": "probe", "hidden": hidden, "dropout": float(dropout)}
    raise ValueError(f"head must be {{'kind': 'linear'}} or {{'kind': 'probe', 'hidden': H, 'dropout': p}}, got {spec}")


class ProbeHead(nn.Module):
    """Standardise the features with the training split's mean and std, then Linear (hidden 0) or a small MLP.

    The standardisation is part of the head (buffers in its state dict), so a checkpoint scores images alone.
    """

    def __init__(self, features: int, classes: int, hidden: int = 0, dropout: float = 0.0) -> None:
        super().__init__()
        self.in_features = features
        self.register_buffer("shift", torch.zeros(features))
        self.register_buffer("scale", torch.ones(features))
        if hidden:
            self.layers: nn.Module = nn.Sequential(
                nn.Linear(features, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, classes)
            )
        else:
            self.layers = nn.Linear(features, classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits for [N, in_features] features."""
        return self.layers((features - self.shift) / self.scale)

    def standardise_with(self, features: torch.Tensor) -> None:
        """Set shift and scale to the per-feature mean and std of features [N, in_features] (e.g. the train split)."""
        with torch.no_grad():
            self.shift.copy_(features.mean(dim=0))
            self.scale.copy_(features.std(dim=0, unbiased=False).clamp_min(_SCALE_FLOOR))


def make_head(spec: Mapping[str, Any] | None, features: int, classes: int) -> nn.Module:
    """The head a spec describes, for features inputs and classes outputs."""
    checked = check_spec(spec)
    if checked["kind"] == "linear":
        return nn.Linear(features, classes)
    return ProbeHead(features, classes, checked["hidden"], checked["dropout"])


def is_probe(spec: Mapping[str, Any] | None) -> bool:
    """Whether a head spec is a probe head."""
    return check_spec(spec)["kind"] == "probe"
