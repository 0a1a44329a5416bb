"""tools/profile_step.py: a train step broken into timed sub-programs and per-op categories."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from tests.helpers import REPO, tiny_config


@pytest.fixture(scope="module")
def profile_step():
    spec = importlib.util.spec_from_file_location(
        "profile_step", REPO / "tools" / "profile_step.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # five programs compiled and timed: ~30 s of CPU
def test_every_part_of_a_tiny_bert_step_is_timed(profile_step, tiny_bert_dir, sst2_slice):
    ours, host_batch = profile_step.profile_ours(
        tiny_config(tiny_bert_dir, sst2_slice), length=16, repeats=1
    )
    assert host_batch["input_ids"].shape[1] == 16
    parts = ("data", "put_batch", "forward", "fwd+bwd", "embed_grad", "update", "step")
    assert set(ours["seconds"]) == set(parts)
    assert all(ours["seconds"][p] > 0 for p in parts)
    flops = ours["gflops"]
    # The backward costs more than the forward; the step is the gradient plus the update.
    assert 0 < flops["forward"] < flops["fwd+bwd"] < flops["step"]
    assert "ENTRY" in ours["hlo"]  # the step's optimized HLO, to name the traced ops


def test_pad_to_pads_or_cuts_token_fields_only(profile_step):
    batch = {
        "input_ids": np.ones((2, 3), np.int32),
        "attention_mask": np.ones((2, 5), np.int32),
        "labels": np.array([0, 1]),
    }
    out = profile_step.pad_to(batch, 4)
    np.testing.assert_array_equal(out["input_ids"], [[1, 1, 1, 0]] * 2)
    assert out["attention_mask"].shape == (2, 4)
    assert out["labels"] is batch["labels"]


@pytest.mark.parametrize(
    "name, op_name, expected",
    [
        (
            "broadcast_add_fusion.3",
            "jvp(M)/Dropout_0/jit(_bernoulli)/jit(_uniform)/add",
            "dropout random bits",
        ),
        (
            "wrapped_broadcast.1",
            "transpose(jvp(M))/embeddings/word_embeddings/jit(_take)/broadcast_in_dim",
            "embedding gradient buffer",
        ),
        ("ynn_fusion.12", "transpose(jvp(M))/layer_0/intermediate/dot_general", "matmul"),
        ("multiply_add_fusion.2", "jit(train_step)/add", "optimizer / metrics"),
        (
            "copy_bitcast_fusion.4",
            "transpose(jvp(M))/layer_0/attention/transpose",
            "elementwise / transposes",
        ),
    ],
)
def test_op_category(profile_step, name, op_name, expected):
    assert profile_step.op_category(name, op_name) == expected
