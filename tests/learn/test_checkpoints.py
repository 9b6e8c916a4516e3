"""Tests for pipeline_lib.learn.checkpoints: early stopping across the two phases, and last.pt refused when it is
damaged or from other inputs (the exact resume itself is tested through train_model in test_train.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeline_lib.learn.checkpoints import STATE_FORMAT, TrainState, load_state, save_state, update_best
from pipeline_lib.learn.history import EpochStats


def _stats(epoch: int, phase: str, val_loss: float) -> EpochStats:
    return EpochStats(epoch, phase, 0.5, 0.5, val_loss, 0.5, 0.01, 1.0)


def test_patience_restarts_at_the_phase_change_and_best_spans_both_phases() -> None:
    state = TrainState("x")
    losses = [("head", 0.5), ("head", 0.6), ("head", 0.7), ("all", 0.9), ("all", 0.8), ("all", 0.85), ("all", 0.95)]
    stopped_at = None
    for epoch, (phase, loss) in enumerate(losses, start=1):
        stats = _stats(epoch, phase, loss)
        state.history.append(stats)
        update_best(state, stats, patience=2, may_stop=phase == "all")
        if state.stopped_early and stopped_at is None:
            stopped_at = epoch
    # Head epochs 2 and 3 exhaust patience 2 but may not stop; the all-layers phase starts a counter of its own:
    # 0.9 (phase best), 0.8 (better), then two epochs without improvement stop at epoch 7.
    assert stopped_at == 7 and state.bad_epochs == 2
    assert state.best_epoch == 1 and state.best_val_loss == 0.5, "best.pt comes from the head phase here"


def test_a_training_state_is_refused_with_its_path_when_damaged_foreign_or_from_other_inputs(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    assert load_state(path, "digest") is None, "no last.pt: a fresh start"
    save_state(path, {"format": STATE_FORMAT, "fingerprint": "digest", "epoch": 2})
    assert load_state(path, "digest")["epoch"] == 2
    with pytest.raises(ValueError, match="other settings or data"):
        load_state(path, "another digest")
    save_state(path, {"format": "something else"})
    with pytest.raises(RuntimeError, match="not an aidetect training state"):
        load_state(path, "digest")
    path.write_bytes(b"not a torch file")
    with pytest.raises(RuntimeError, match=re.escape(f"training state {path} is corrupt")):
        load_state(path, "digest")
