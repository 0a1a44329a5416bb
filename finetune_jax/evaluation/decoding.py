"""The token-by-token decode loops every generator shares: greedy / sampled, and beam search.

Both run inside one jitted program as a `lax.while_loop` over a model-agnostic step:

    step(tokens_B1, t, cache) -> (logits_BV float32, cache)

feeds the token chosen at generation step `t - 1` (of every row) and returns the logits for
step `t`; the caller has already run the prompt (prefill) and passes its last logits. A
causal LM's step feeds its KV cache with positions after a left-padded prompt
(`lm_generation.py`), an encoder-decoder's its self-attention cache over a fixed memory
(`transcription.py`); a new model family brings only its step. Every cache leaf has the
batch on axis 0, so beam search reorders a cache with one gather.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

Step = Callable[[jax.Array, jax.Array, Any], tuple[jax.Array, Any]]
NEG = -1.0e9  # transformers' "impossible" score in beam search (finite, unlike -inf)


def greedy_search(
    step: Step,
    logits_BV: jax.Array,
    cache: Any,
    max_new_tokens: int,
    choose: Callable[[jax.Array, jax.Array], jax.Array],
    eos_ids: tuple[int, ...],
    pad_id: int,
    done_B: jax.Array,
) -> jax.Array:
    """New tokens [B, max_new_tokens] int32, one `choose(logits_BV, t) -> [B]` per step.

    A row that emits an EOS id keeps it and emits `pad_id` after; rows already `done_B`
    (batch filler) emit only `pad_id`; the loop stops once every row is done.
    """
    eos_E = jnp.asarray(eos_ids, jnp.int32)
    token_B = jnp.where(done_B, pad_id, choose(logits_BV, jnp.int32(0)))
    batch = token_B.shape[0]
    out_BN = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(token_B)
    done_B = done_B | jnp.isin(token_B, eos_E)

    def cond(state):
        t, _, done_B, _ = state
        return (t < max_new_tokens) & ~jnp.all(done_B)

    def body(state):
        t, cache, done_B, out_BN = state
        previous_B1 = lax.dynamic_slice_in_dim(out_BN, t - 1, 1, axis=1)
        logits_BV, cache = step(previous_B1, t, cache)
        token_B = jnp.where(done_B, pad_id, choose(logits_BV, t))
        out_BN = lax.dynamic_update_slice_in_dim(out_BN, token_B[:, None], t, axis=1)
        return t + 1, cache, done_B | jnp.isin(token_B, eos_E), out_BN

    return lax.while_loop(cond, body, (jnp.int32(1), cache, done_B, out_BN))[3]


def repeat_beams(tree: Any, num_beams: int) -> Any:
    """Every leaf's batch rows repeated `num_beams` times (row b -> rows b*K ... b*K+K-1)."""
    return jax.tree.map(lambda x: jnp.repeat(x, num_beams, axis=0), tree)


def beam_search(
    step: Step,
    logits_BKV: jax.Array,
    cache: Any,
    num_beams: int,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    length_penalty: float = 1.0,
    process: Callable[[jax.Array, jax.Array], jax.Array] = lambda log_probs, t: log_probs,
) -> jax.Array:
    """The best beam's new tokens [B, max_new_tokens] int32 (EOS kept, then `pad_id`).

    transformers' beam search (`early_stopping=False`, one EOS id), step for step: log-softmax
    of each beam's logits, then `process(log_probs_RV, t)` (suppressed tokens -> -inf), added
    to the beam's running score; the top 2K continuations of each row's K x V; those ending in
    EOS (or reaching max_new_tokens) among the first K become finished hypotheses scored
    `sum log p / generated_length ** length_penalty` (EOS counted), the best K unfinished
    continue (their caches gathered from their parents' rows); a row stops when its best
    running beam, length-penalised at the current length, cannot beat its worst kept
    hypothesis. `logits_BKV` [B*K, V] and `cache` hold K identical rows per input (see
    `repeat_beams`), rows b*K ... b*K+K-1 for input b.
    """
    k, n = num_beams, max_new_tokens
    rows, vocab = logits_BKV.shape
    batch = rows // k
    penalty = lambda length: jnp.asarray(length, jnp.float32) ** length_penalty  # noqa: E731
    keep = jnp.arange(2 * k) < k  # only the first K of the 2K candidates may finish
    state = {
        "t": jnp.int32(0),
        "logits": logits_BKV,
        "cache": cache,
        "running": jnp.full((batch, k, n), pad_id, jnp.int32),
        # Beam 0 only at first: the K beams start identical.
        "running_scores": jnp.zeros((batch, k)).at[:, 1:].set(NEG),
        "finished": jnp.full((batch, k, n), pad_id, jnp.int32),
        "finished_scores": jnp.full((batch, k), NEG),
        "is_finished": jnp.zeros((batch, k), bool),
        "improvable": jnp.ones((batch,), bool),
        "all_hit": jnp.bool_(False),
    }

    def cond(s):
        return (s["t"] < n) & jnp.any(s["improvable"]) & ~s["all_hit"]

    def body(s):
        t = s["t"]
        log_probs = process(jax.nn.log_softmax(s["logits"].astype(jnp.float32), axis=-1), t)
        scores_BKV = log_probs.reshape(batch, k, vocab) + s["running_scores"][:, :, None]
        top_scores, top_index = lax.top_k(scores_BKV.reshape(batch, k * vocab), 2 * k)
        parent, token = top_index // vocab, (top_index % vocab).astype(jnp.int32)
        candidates = jnp.take_along_axis(s["running"], parent[:, :, None], axis=1)
        candidates = lax.dynamic_update_slice_in_dim(candidates, token[:, :, None], t, axis=2)
        hits = (token == eos_id) | (t + 1 >= n)

        # The best K continuations that did not stop keep running.
        running_scores, pick = lax.top_k(top_scores + hits * NEG, k)
        running = jnp.take_along_axis(candidates, pick[:, :, None], axis=1)
        source_rows = jnp.take_along_axis(parent, pick, axis=1) + jnp.arange(batch)[:, None] * k
        cache = jax.tree.map(lambda x: x[source_rows.reshape(-1)], s["cache"])

        # Stopped ones among the first K join the kept hypotheses if they score better.
        done = hits & keep[None, :]
        final = top_scores / penalty(t + 1)
        final = final + (~s["improvable"])[:, None] * NEG + (~done) * NEG
        merged_scores = jnp.concatenate([s["finished_scores"], final], axis=1)
        finished_scores, best = lax.top_k(merged_scores, k)
        merged = jnp.concatenate([s["finished"], candidates], axis=1)
        finished = jnp.take_along_axis(merged, best[:, :, None], axis=1)
        merged_flags = jnp.concatenate([s["is_finished"], done], axis=1)
        is_finished = jnp.take_along_axis(merged_flags, best, axis=1)

        # Can the best running beam still beat the worst kept hypothesis?
        worst = jnp.where(is_finished, jnp.min(finished_scores, axis=1, keepdims=True), NEG)
        best_possible = running_scores[:, :1] / penalty(t + 1)
        improvable = s["improvable"] & jnp.any(best_possible > worst, axis=1)

        logits, cache = step(running[:, :, t].reshape(rows, 1), t + 1, cache)
        return {
            "t": t + 1,
            "logits": logits,
            "cache": cache,
            "running": running,
            "running_scores": running_scores,
            "finished": finished,
            "finished_scores": finished_scores,
            "is_finished": is_finished,
            "improvable": improvable,
            "all_hit": jnp.all(hits),
        }

    return lax.while_loop(cond, body, state)["finished"][:, 0]
