"""Pure train / eval steps and the objectives they evaluate. Objective (model + loss),
optimizer and schedule are bound with `functools.partial` at setup, so nothing from the
config crosses into `jit`.

An objective is `(params, batch, rng or None) -> (summed loss, predictions)`; rng None means
deterministic (eval). `logits_objective` runs the model to its outputs and a loss on them;
`chunked_lm_objective` runs a causal LM to its hidden state and applies the LM head chunk by
chunk inside the loss, so no [B, T, V] logits exist.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from finetune_jax.tasks import losses
from finetune_jax.training.state import TrainState

Batch = dict[str, jax.Array]
# Batch keys passed to the model (those present): text token fields, images' pixel_values,
# or an encoder-decoder's encoder input (log-mel input_features) and decoder tokens.
MODEL_INPUTS = (
    "input_ids",
    "attention_mask",
    "token_type_ids",
    "segment_ids",
    "positions",
    "pixel_values",
    "input_features",
    "decoder_input_ids",
    "decoder_attention_mask",
)
# Batch keys a task's eval scorer reads beside the predictions (token classification: which
# pieces start a word; translation: each row's index in its split, whose texts it scores
# against), returned by the eval step as they are.
SCORED_INPUTS = ("word_starts", "row_ids")
# (params, batch, rng or None) -> (summed loss, predictions)
Objective = Callable[[Any, Batch, Any], tuple[jax.Array, jax.Array]]


def _forward(apply_fn: Callable, params: Any, batch: Batch, rng: jax.Array | None) -> jax.Array:
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    if rng is None:
        return apply_fn({"params": params}, **inputs, deterministic=True)
    return apply_fn({"params": params}, **inputs, deterministic=False, rngs={"dropout": rng})


def logits_objective(
    params: Any, batch: Batch, rng: jax.Array | None, *, apply_fn: Callable, loss_fn: Callable
) -> tuple[jax.Array, jax.Array]:
    """The model's full outputs through `loss_fn(outputs, labels, weights)`."""
    outputs = _forward(apply_fn, params, batch, rng)
    return loss_fn(outputs, batch["labels"], batch["weights"])


def chunked_lm_objective(
    params: Any,
    batch: Batch,
    rng: jax.Array | None,
    *,
    hidden_fn: Callable,
    head_fn: Callable,
    chunk: int,
) -> tuple[jax.Array, jax.Array]:
    """`next_token_loss` with the LM head applied `chunk` tokens at a time.

    hidden_fn: the model's apply returning the final hidden state [B, T, D]; head_fn: its
    apply mapping hidden [B, C, D] to float32 logits [B, C, V] with the model's own head
    (LoRA on it included). Each chunk draws its own dropout key (LoRA dropout on the head),
    so only the deterministic forms equal `next_token_loss` exactly.
    """
    hidden_BTD = _forward(hidden_fn, params, batch, rng)

    def head(h_BCD, index):
        if rng is None:
            return head_fn({"params": params}, h_BCD, deterministic=True)
        chunk_rng = jax.random.fold_in(rng, index)
        return head_fn({"params": params}, h_BCD, deterministic=False, rngs={"dropout": chunk_rng})

    return losses.chunked_next_token_loss(
        hidden_BTD, batch["labels"], batch["weights"], head, chunk
    )


def _split_microbatches(batch: Batch, microbatches: int) -> Batch:
    """[B, ...] -> [M, B/M, ...]: microbatch m holds rows m*B/M ... (m+1)*B/M - 1."""

    def split(x):
        if x.shape[0] % microbatches:
            raise ValueError(
                f"batch of {x.shape[0]} rows does not split into {microbatches} microbatches"
            )
        return x.reshape(microbatches, x.shape[0] // microbatches, *x.shape[1:])

    return jax.tree.map(split, batch)


def trainable_grads(
    objective: Objective,
    params: Any,
    trainable: Any,
    batch: Batch,
    rng: jax.Array,
    microbatches: int = 1,
) -> tuple[jax.Array, list[jax.Array]]:
    """(summed loss, summed gradients of the *trainable* leaves only, in tree order).

    Differentiating only with respect to trainable leaves means no frozen gradient is ever
    formed, whatever XLA would have pruned. With microbatches > 1 a `lax.scan` accumulates
    the gradient in one buffer, so memory holds one microbatch's activations at a time.
    """
    leaves, treedef = jax.tree.flatten(params)
    mask = jax.tree.leaves(trainable)
    if len(mask) != len(leaves):
        raise ValueError(f"trainable mask has {len(mask)} leaves, params have {len(leaves)}")

    def loss_sum(train_leaves, mb, mb_rng):
        it = iter(train_leaves)
        merged = treedef.unflatten([next(it) if t else leaf for leaf, t in zip(leaves, mask)])
        return objective(merged, mb, mb_rng)[0]

    train_leaves = [leaf for leaf, t in zip(leaves, mask) if t]
    grad_fn = jax.value_and_grad(loss_sum)
    if microbatches == 1:
        return grad_fn(train_leaves, batch, rng)

    def accumulate(carry, xs):
        total, acc = carry
        mb, index = xs
        value, grads = grad_fn(train_leaves, mb, jax.random.fold_in(rng, index))
        return (total + value, [a + g.astype(a.dtype) for a, g in zip(acc, grads)]), None

    init = (
        jnp.zeros((), jnp.float32),
        [jnp.zeros(leaf.shape, jnp.float32) for leaf in train_leaves],
    )
    (total, grads), _ = jax.lax.scan(
        accumulate, init, (_split_microbatches(batch, microbatches), jnp.arange(microbatches))
    )
    return total, grads


def train_step(
    state: TrainState,
    batch: Batch,
    *,
    objective: Objective,
    tx: optax.GradientTransformation,
    lr_fn: optax.Schedule,
    trainable: Any,
    microbatches: int = 1,
    skip_nonfinite: bool = False,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update on a batch; returns the new state and metrics.

    Metrics: scalar `loss`, `grad_norm`, `lr`, `skipped` (1 if a non-finite update was
    dropped) and `grad_finite`, one flag per trainable leaf, so the host can name the first
    parameter whose gradient went bad. With `skip_nonfinite` a step whose loss or gradients
    are not finite leaves params and optimizer state as they were (the step still counts).
    """
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    weight_sum = jnp.maximum(jnp.sum(batch["weights"]), 1.0)
    loss_sum, grads = trainable_grads(objective, state.params, trainable, batch, rng, microbatches)
    # In the gradients' own dtype: a float32 quotient of bfloat16 gradients would be a float32
    # copy of every one of them (XLA materialises it: several fusions read it).
    grads = [g / weight_sum.astype(g.dtype) for g in grads]
    # Frozen leaves get a zero gradient that no transform reads (set_to_zero ignores it).
    it = iter(grads)
    full_grads = jax.tree.map(
        lambda p, t: next(it) if t else jnp.zeros_like(p), state.params, trainable
    )
    updates, opt_state = tx.update(full_grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # Finiteness from each leaf's squared norm (the sums the norm and clipping compute
    # anyway): a NaN or inf gradient makes its sum non-finite, and no [param]-sized mask is
    # formed. A finite gradient whose squares overflow (norm > ~1e19) also counts as bad.
    squares = [optax.tree.norm(g, squared=True) for g in grads]
    grad_finite = jnp.stack([jnp.isfinite(s) for s in squares])
    finite = jnp.isfinite(loss_sum) & jnp.all(grad_finite)
    if skip_nonfinite:
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
    metrics = {
        "loss": loss_sum / weight_sum,
        "grad_norm": jnp.sqrt(sum(squares)),
        "lr": lr_fn(state.step),
        "skipped": (~finite).astype(jnp.float32) if skip_nonfinite else jnp.zeros(()),
        "grad_finite": grad_finite,
    }
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics


def eval_step(params: Any, batch: Batch, *, objective: Objective) -> dict[str, jax.Array]:
    """Summed loss and weight, and the global batch's predictions, labels and weights.

    Labels and weights come back with the predictions so that, with several processes (each
    holding only its rows of the batch), every host computes metrics over the same global set.
    """
    loss_sum, predictions = objective(params, batch, None)
    return {
        "loss_sum": loss_sum,
        "weight_sum": jnp.sum(batch["weights"]),
        "predictions": predictions,
        "labels": batch["labels"],
        "weights": batch["weights"],
        **{k: batch[k] for k in SCORED_INPUTS if k in batch},
    }


def predict_step(params: Any, batch: Batch, *, apply_fn: Callable) -> dict[str, jax.Array]:
    """float32 logits [B, num_labels] and the pooled features the head reads [B, F] (the
    model sows them as `intermediates/features`), for predict and drift monitoring; the
    weights come back so every process knows the global batch's real rows."""
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    logits, state = apply_fn(
        {"params": params}, **inputs, deterministic=True, mutable=["intermediates"]
    )
    (features,) = state["intermediates"]["features"]
    return {
        "logits": logits.astype(jnp.float32),
        "features": features.astype(jnp.float32),
        "weights": batch["weights"],
    }
