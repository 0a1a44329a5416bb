"""The open log window: what it logs, and that a window saved and restored mid-way (as a
checkpoint does) logs bitwise what an unbroken one logs."""

import json

import numpy as np
import pytest

from finetune_jax.training.log_window import LogWindow


def step_metrics(count, seed=0):
    """Per-step host metrics as the train step returns them (float32 scalars, a flag array)."""
    rng = np.random.default_rng(seed)
    return [
        {
            "loss": np.float32(rng.uniform(0.1, 2.0)),
            "grad_norm": np.float32(rng.uniform(0.1, 5.0)),
            "lr": np.float32(1e-4 * (count - i) / count),
            "skipped": np.float32(i % 3 == 0),
            "grad_finite": np.ones(4, bool),
        }
        for i in range(count)
    ]


def test_window_logs_means_counts_and_the_last_point_value():
    steps = step_metrics(13)
    window = LogWindow()
    for m in steps:
        window.add(m)
    values = window.values()
    assert set(values) == {"loss", "grad_norm", "lr", "skipped"}  # the flag array is not logged
    for name in ("loss", "grad_norm"):
        assert values[name] == pytest.approx(np.mean([m[name] for m in steps], dtype=np.float64))
    assert values["skipped"] == sum(float(m["skipped"]) for m in steps)
    assert values["lr"] == float(steps[-1]["lr"])


@pytest.mark.parametrize("cut", [1, 5, 12])
def test_window_saved_and_restored_mid_way_logs_bitwise_the_same(cut):
    steps = step_metrics(13, seed=cut)
    unbroken = LogWindow()
    for m in steps:
        unbroken.add(m)
    first = LogWindow()
    for m in steps[:cut]:
        first.add(m)
    saved = json.loads(json.dumps(first.to_dict()))  # as the checkpoint's JSON item holds it
    resumed = LogWindow.from_dict(saved)
    for m in steps[cut:]:
        resumed.add(m)
    assert resumed.values() == unbroken.values()


def test_no_saved_window_is_an_empty_one():
    assert LogWindow.from_dict(None) == LogWindow() == LogWindow.from_dict({})
