"""Which checkpoint is "best" when evals tie: the one early stopping (and summary.json's
best_step) names, so `eval --checkpoint=best` restores the checkpoint the run reported."""

from __future__ import annotations

import flax
import jax.numpy as jnp
import pytest

from finetune_jax.training import checkpoints
from finetune_jax.training.early_stopping import EarlyStopping


@flax.struct.dataclass
class _State:
    step: jnp.ndarray
    params: dict


@pytest.mark.parametrize(
    ("metric", "values"),
    [("accuracy", [0.5, 1.0, 1.0, 0.75]), ("loss", [0.9, 0.2, 0.2, 0.4])],
)
def test_tied_evals_pick_the_step_early_stopping_reports(tmp_path, metric, values):
    mode = "min" if metric == "loss" else "max"
    manager = checkpoints.make_manager(tmp_path, keep=1, metric=metric, mode=mode, async_save=False)
    stopper = EarlyStopping(metric)
    for step, value in enumerate(values, start=1):
        stopper.update(value, step)
        state = _State(step=jnp.asarray(step), params={"w": jnp.full((2,), float(step))})
        checkpoints.save(manager, state, {"data": {}}, metrics={metric: value})
    checkpoints.wait(manager)
    assert stopper.best_step == 2  # the first of the tied best evals
    assert manager.best_step() == stopper.best_step
    # The tie's later checkpoint is not what the keep policy holds on to as best.
    assert sorted(manager.all_steps()) == [2, 4]
    checkpoints.close(manager)
