"""Causal-LM losses: the chunked form (LM head applied chunk by chunk, from the hidden state)
equals the full-logits form in loss, gradients and predictions; tied and untied heads, LoRA on
the head, lengths the chunk does not divide, weight-0 positions."""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from finetune_jax.models import llama
from finetune_jax.models import lora as lora_lib
from finetune_jax.tasks import losses
from finetune_jax.training import steps
from tests.test_llama import TINY

# LoRA on the untied head and on an attention projection; a tied head has no lm_head kernel.
HEAD_LORA = lora_lib.LoraConfig(rank=4, alpha=8.0, targets=r"(lm_head|.*/q_proj)/kernel")
VARIANTS = {
    "untied": TINY,
    "tied": dataclasses.replace(TINY, tie_word_embeddings=True),
    "untied_lora_head": dataclasses.replace(TINY, lora=HEAD_LORA),
}


def _params(config):
    params = nn.meta.unbox(llama.init_params(config, jax.random.PRNGKey(0)))
    # LoRA B starts at zero; a random B makes the head's LoRA term (and its A gradient) real.
    leaves = jax.tree_util.tree_leaves_with_path(params)
    rng = np.random.default_rng(1)
    updates = {
        jax.tree_util.keystr(path): rng.normal(0, 0.1, leaf.shape).astype(np.float32)
        for path, leaf in leaves
        if "lora_b" in jax.tree_util.keystr(path)
    }
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: updates.get(jax.tree_util.keystr(path), leaf), params
    )


def _batch(length=21, seed=0):
    """Two rows, the second right-padded: weight 0 (and attention mask 0) on its tail."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, TINY.vocab_size, (2, length)).astype(np.int32)
    mask = np.ones((2, length), np.int32)
    mask[1, 13:] = 0
    weights = (rng.random((2, length)) > 0.3).astype(np.float32) * mask
    labels = np.roll(ids, -1, axis=1)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "weights": weights,
    }


def _objectives(config, chunk):
    module = llama.LlamaForCausalLM(config)
    plain = functools.partial(
        steps.logits_objective, apply_fn=module.apply, loss_fn=losses.next_token_loss
    )
    chunked = functools.partial(
        steps.chunked_lm_objective,
        hidden_fn=functools.partial(module.apply, return_hidden=True),
        head_fn=functools.partial(module.apply, method="logits_from_hidden"),
        chunk=chunk,
    )
    return plain, chunked


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("chunk", [8, 64])
def test_chunked_loss_and_grads_equal_full_logits(variant, chunk):
    config = VARIANTS[variant]
    params, batch = _params(config), _batch()
    plain, chunked = _objectives(config, chunk)
    trainable = jax.tree.map(lambda _: True, params)
    grads = {}
    for name, objective in (("plain", plain), ("chunked", chunked)):
        fn = jax.jit(functools.partial(steps.trainable_grads, objective, trainable=trainable))
        grads[name] = fn(params, batch=batch, rng=jax.random.key(0))
    (loss_plain, g_plain), (loss_chunked, g_chunked) = grads["plain"], grads["chunked"]
    assert float(loss_plain) > 0
    np.testing.assert_allclose(loss_chunked, loss_plain, rtol=1e-6)
    assert len(g_chunked) == len(g_plain)
    for a, b in zip(g_chunked, g_plain):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
    if variant == "untied_lora_head":  # the head's LoRA params got (nonzero) gradients
        paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
        head = [g for p, g in zip(paths, g_chunked) if "lm_head" in p and "lora" in p]
        assert len(head) == 2 and all(np.abs(g).max() > 0 for g in head)


@pytest.mark.parametrize("variant", ["untied", "tied"])
def test_chunked_eval_predictions_equal_full_logits(variant):
    config = VARIANTS[variant]
    params, batch = _params(config), _batch(length=19)
    plain, chunked = _objectives(config, chunk=4)
    loss_plain, pred_plain = jax.jit(plain)(params, batch, None)
    loss_chunked, pred_chunked = jax.jit(chunked)(params, batch, None)
    np.testing.assert_allclose(loss_chunked, loss_plain, rtol=1e-6)
    assert pred_chunked.shape == (2, 19) and pred_chunked.dtype == pred_plain.dtype
    np.testing.assert_array_equal(pred_chunked, pred_plain)


def test_chunked_loss_ignores_nonfinite_hidden_on_weight_0_positions():
    # As `causal_lm_loss`: a bad value on a position nobody trains must not poison the sum.
    hidden = jnp.ones((1, 5, 3)).at[0, 4].set(jnp.inf)
    kernel = jnp.arange(12.0).reshape(3, 4) / 10
    head = lambda h, _: h @ kernel
    labels = jnp.array([[0, 1, 2, 3, 0]])
    weights = jnp.array([[1.0, 1.0, 0.0, 1.0, 0.0]])
    total, _ = losses.chunked_next_token_loss(hidden, labels, weights, head, chunk=2)
    expected, _ = losses.causal_lm_loss(hidden[:, :4] @ kernel, labels[:, :4], weights[:, :4])
    np.testing.assert_allclose(total, expected, rtol=1e-6)


def test_multi_label_loss_is_mean_sigmoid_bce_per_row():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (6, 4)).astype(np.float32)
    labels = (rng.random((6, 4)) < 0.4).astype(np.float32)
    weights = np.asarray([1, 1, 1, 1, 0, 0], np.float32)  # two padding rows
    total, predictions = losses.multi_label_loss(jnp.asarray(logits), labels, weights)
    # Direct numpy: -[y log s + (1 - y) log(1 - s)], mean over classes, weighted rows.
    s = 1 / (1 + np.exp(-logits.astype(np.float64)))
    bce = -(labels * np.log(s) + (1 - labels) * np.log(1 - s)).mean(axis=1)
    np.testing.assert_allclose(float(total), np.sum(bce * weights), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(predictions), (s > 0.5).astype(np.int32))


def test_loss_is_chosen_by_problem_type():
    from finetune_jax.data import text_tasks
    from finetune_jax.tasks.text_classification import KIND

    assert KIND.loss(text_tasks.GENERIC["multi_label"]) is losses.multi_label_loss
    assert KIND.loss(text_tasks.PRESETS["stsb"]) is losses.regression_loss
    assert KIND.loss(text_tasks.PRESETS["sst2"]) is losses.classification_loss
