"""Pure train / eval steps. Model, optimizer, loss and schedule are bound with
`functools.partial` at setup, so nothing from the config crosses into `jit`.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from finetune_jax.state import TrainState

Batch = dict[str, jax.Array]
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def _forward(apply_fn: Callable, params: Any, batch: Batch, rng: jax.Array | None) -> jax.Array:
  inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
  if rng is None:
    return apply_fn({"params": params}, **inputs, deterministic=True)
  return apply_fn({"params": params}, **inputs, deterministic=False, rngs={"dropout": rng})


def train_step(state: TrainState, batch: Batch, *, apply_fn: Callable,
               tx: optax.GradientTransformation, loss_fn: Callable, lr_fn: optax.Schedule,
               trainable: Any) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer update on a batch; returns the new state and scalar metrics."""
  rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  weight_sum = jnp.maximum(jnp.sum(batch["weights"]), 1.0)

  def mean_loss(params):
    logits = _forward(apply_fn, params, batch, rng)
    loss_sum, _ = loss_fn(logits, batch["labels"], batch["weights"])
    return loss_sum / weight_sum

  loss, grads = jax.value_and_grad(mean_loss)(state.params)
  # Only trainable gradients are read: anything else would make XLA compute frozen ones.
  trainable_grads = [g for g, t in zip(jax.tree.leaves(grads), jax.tree.leaves(trainable)) if t]
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {"loss": loss, "grad_norm": optax.tree.norm(trainable_grads),
             "lr": lr_fn(state.step)}
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params: Any, batch: Batch, *, apply_fn: Callable, loss_fn: Callable
              ) -> dict[str, jax.Array]:
  """Summed loss, weight and per-example predictions (metrics are computed on the host)."""
  logits = _forward(apply_fn, params, batch, None)
  loss_sum, predictions = loss_fn(logits, batch["labels"], batch["weights"])
  return {"loss_sum": loss_sum, "weight_sum": jnp.sum(batch["weights"]),
          "predictions": predictions}
