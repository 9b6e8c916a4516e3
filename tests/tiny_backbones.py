"""Tiny randomly initialised foundation backbones for tests: the same classes (open_clip's VisionTransformer, timm's
VisionTransformer) with one block and a few dozen channels, so that a test builds, trains and explains them in
milliseconds without any weights file."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import warnings

import pytest
import torch
from torch import nn

from pipeline_lib.learn import foundation

CLIP_SIZE = 32  # a tiny CLIP takes 32 x 32 inputs (patch 8: a 4 x 4 grid)
DINO_SIZE = 28  # a tiny DINOv2 takes multiples of 14 (28: a 2 x 2 grid)
TINY_CLIP = {"embed_dim": 8, "vision_cfg": {"layers": 1, "width": 32, "patch_size": 8, "image_size": CLIP_SIZE,
                                            "head_width": 16}}  # fmt: skip
TINY_DINO = {"img_size": DINO_SIZE, "depth": 1, "embed_dim": 32, "num_heads": 2}


def use_tiny_backbones(monkeypatch: pytest.MonkeyPatch, **pins: str) -> None:
    """Make every foundation spec build its tiny version (weights sources unchanged unless pinned: name=sha256)."""
    for name, spec in list(foundation.SPECS.items()):
        if spec.library == "open_clip":
            tiny = dataclasses.replace(spec, overrides=TINY_CLIP, input_size=CLIP_SIZE, patch=8)
        else:
            tiny = dataclasses.replace(spec, overrides=TINY_DINO)
        if name in pins:
            tiny = dataclasses.replace(tiny, weights=dataclasses.replace(tiny.weights, sha256=pins[name]))
        monkeypatch.setitem(foundation.SPECS, name, tiny)


class _OpenAIStyle(nn.Module):
    """What OpenAI's CLIP archive holds, in small: the image tower under visual., and other parameters beside it."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual
        self.logit_scale = nn.Parameter(torch.ones([]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(x) * self.logit_scale


def torchscript_file(visual: nn.Module) -> tuple[bytes, str]:
    """(bytes of a TorchScript archive holding visual as OpenAI's CLIP files do, their sha256)."""
    with warnings.catch_warnings():  # torch.jit.trace is deprecated, and warns of each data-dependent branch
        warnings.simplefilter("ignore")
        example = torch.rand(1, 3, CLIP_SIZE, CLIP_SIZE)
        traced = torch.jit.trace(_OpenAIStyle(visual).eval(), example, check_trace=False)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    data = buffer.getvalue()
    return data, hashlib.sha256(data).hexdigest()


def safetensors_file(state: dict[str, torch.Tensor]) -> tuple[bytes, str]:
    """(bytes of a safetensors file of state, their sha256)."""
    from safetensors.torch import save

    data = save({key: value.contiguous() for key, value in state.items()})
    return data, hashlib.sha256(data).hexdigest()
