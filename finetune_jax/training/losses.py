"""Per-example-weighted losses. Padding rows of a fixed-shape batch carry weight 0."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def classification_loss(
    logits: jax.Array, labels: jax.Array, weights: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(sum of weighted cross-entropy, predicted class ids)."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    return jnp.sum(losses * weights), jnp.argmax(logits, axis=-1)


def regression_loss(
    logits: jax.Array, labels: jax.Array, weights: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(sum of weighted squared error, predictions) for a single-output head."""
    predictions = logits[..., 0].astype(jnp.float32)
    return jnp.sum(jnp.square(predictions - labels) * weights), predictions


def loss_for(task):
    """Pick the loss at setup time, so the jitted step holds no branch on the task."""
    if task.kind == "causal_lm":
        return next_token_loss
    return regression_loss if task.num_labels == 1 else classification_loss


def causal_lm_loss(
    logits: jax.Array, targets: jax.Array, loss_mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(sum of masked next-token cross-entropy, number of trained tokens), both float32.

    logits [B, T, V] at position t predict targets[:, t] (already shifted by the data
    pipeline); loss_mask [B, T] is 1 on trained tokens. Sums, not means, so packed and
    unpacked batches, microbatches and hosts add up exactly; divide by the count once.
    """
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    mask = loss_mask.astype(jnp.float32)
    # where, not a product: a non-finite logit on a padding position must not poison the
    # sum (its gradient is still NaN, which train.nonfinite then reports or skips).
    return jnp.sum(jnp.where(mask > 0, losses * mask, 0.0)), jnp.sum(mask)


def next_token_loss(
    logits: jax.Array, labels: jax.Array, weights: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(sum of masked next-token cross-entropy, argmax next tokens [B, T]).

    The steps' (logits, labels, weights) form of `causal_lm_loss`: labels are the shifted
    targets and weights the loss mask, so the steps divide by the number of trained tokens.
    """
    return causal_lm_loss(logits, labels, weights)[0], jnp.argmax(logits, axis=-1)
