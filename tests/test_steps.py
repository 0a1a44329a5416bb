"""The pure train step: gradient accumulation equals one big batch; frozen leaves get no
gradient computation; the chunked causal-LM loss never forms [batch, length, vocab] logits."""

import re

import jax
import numpy as np

from finetune_jax.training import builder
from tests.helpers import run_steps, tiny_config
from tests.test_sft_train import tiny_sft_config


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


def _full_logits_shapes(lowered_text: str, rows: int, vocab: int) -> list[str]:
    """float32 tensors [..., vocab] with at least `rows` = batch x length positions: full
    logits in any layout ([B, T, V], [B*T, V], a stacked [N, B, C, V])."""
    shapes = set(re.findall(r"tensor<([0-9x]+)xf32>", lowered_text))
    dims = [tuple(map(int, s.split("x"))) for s in shapes]
    return [d for d in dims if d[-1] == vocab and np.prod(d[:-1]) >= rows]


def test_chunked_lm_loss_holds_no_full_logits(tiny_chat_llama_dir):
    # Lowered programs of both steps, and the compiled train step's scratch memory, for the
    # full-logits form (0) and chunks of 64 of the 256-token rows; a revert to full logits in
    # the chunked path would fail the first assertion.
    temp_bytes = {}
    for chunk in (0, 64):
        exp = builder.build(tiny_sft_config(tiny_chat_llama_dir, **{"model.lm_loss_chunk": chunk}))
        state = exp.initial_state()
        batch = exp.put_batch(next(exp.data.train_batches()))
        rows, vocab = batch["labels"].size, exp.model_config.vocab_size
        lowered = exp.train_step.lower(state, batch)
        full = _full_logits_shapes(lowered.as_text(), rows, vocab)
        full += _full_logits_shapes(exp.eval_step.lower(state.params, batch).as_text(), rows, vocab)
        assert bool(full) == (chunk == 0), (chunk, full)
        temp_bytes[chunk] = lowered.compile().memory_analysis().temp_size_in_bytes
    assert batch["labels"].shape == (4, 256) and vocab > 40_000
    # The chunks save at least most of one whole [rows, vocab] float32 logits tensor.
    assert temp_bytes[0] - temp_bytes[64] > 0.75 * rows * vocab * 4, temp_bytes
