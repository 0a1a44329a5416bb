"""The pure train step: gradient accumulation equals one big batch; frozen leaves get no
gradient computation."""

import jax
import numpy as np

from finetune_jax.training import builder
from tests.helpers import run_steps, tiny_config


def run(config, steps=2):
    _, state, losses = run_steps(config, steps)
    return jax.device_get(state.params), losses


def test_four_microbatches_of_8_equal_one_batch_of_32(tiny_bert_dir, sst2_slice):
    config = tiny_config(tiny_bert_dir, sst2_slice, batch_size=32)
    config.model.dropout = 0.0  # dropout masks are drawn per microbatch
    params_one, losses_one = run(config)
    config.train.microbatches = 4
    params_acc, losses_acc = run(config)
    np.testing.assert_allclose(losses_acc, losses_one, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(params_acc), jax.tree.leaves(params_one)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_linear_probe_step_computes_no_backbone_gradient(tiny_bert_dir, sst2_slice):
    # The compiled step's FLOPs: with the backbone frozen only the head's backward remains,
    # so the step costs little more than a forward pass (about 1/3 of full fine-tuning).
    flops = {}
    for preset in ("full", "linear_probe"):
        config = tiny_config(tiny_bert_dir, sst2_slice)
        config.optim.preset = preset
        exp = builder.build(config)
        state = exp.initial_state()
        batch = exp.put_batch(next(exp.data.train_batches()))
        cost = exp.train_step.lower(state, batch).compile().cost_analysis()
        flops[preset] = (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]
    assert flops["linear_probe"] < 0.5 * flops["full"]
