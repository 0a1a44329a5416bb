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


def loss_for(num_labels: int):
    """Pick the loss at setup time, so the jitted step holds no branch on the task."""
    return regression_loss if num_labels == 1 else classification_loss
