"""Per-example-weighted losses. Padding rows of a fixed-shape batch carry weight 0.

Causal LMs have two forms of the same loss: `next_token_loss` on full logits [B, T, V], and
`chunked_next_token_loss`, which applies the LM head to `chunk` positions at a time so that
neither pass holds [B, T, V] float32 (17 GB for a 128k vocabulary at 8 x 4096 tokens).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax import lax


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


def multi_label_loss(
    logits: jax.Array, labels: jax.Array, weights: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(sum over rows of weighted sigmoid binary cross-entropy, averaged over the classes;
    multi-hot predictions, 1 where sigmoid(logit) > 0.5). labels: float multi-hot [B, C].

    The per-row mean over classes makes loss / rows equal transformers'
    `BCEWithLogitsLoss` (a mean over all B x C entries) on unpadded batches.
    """
    losses = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), labels)
    per_row = jnp.mean(losses, axis=-1)
    return jnp.sum(per_row * weights), (logits > 0).astype(jnp.int32)


def causal_lm_loss(
    logits: jax.Array, targets: jax.Array, loss_mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(sum of masked next-token cross-entropy, number of trained tokens), both float32.

    logits [B, T, V] at position t predict targets[:, t] (already shifted by the data
    pipeline); loss_mask [B, T] is 1 on trained tokens. Sums, not means, so packed and
    unpacked batches, microbatches and hosts add up exactly; divide by the count once.
    """
    logits = logits.astype(jnp.float32)
    # The target's logit as a masked sum over the vocabulary rather than a gather: with the
    # vocabulary split over devices (the `vocab` sharding rule) both this and the logsumexp
    # reduce locally plus one small all-reduce, where a gather's gradient is a scatter into a
    # whole-vocabulary [B, T, V] tensor on every device.
    vocab = lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    target_logit = jnp.sum(jnp.where(vocab == targets[..., None], logits, 0.0), axis=-1)
    losses = jax.nn.logsumexp(logits, axis=-1) - target_logit
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


def chunked_next_token_loss(
    hidden_BTD: jax.Array,
    labels: jax.Array,
    weights: jax.Array,
    head_fn: Callable[[jax.Array, jax.Array], jax.Array],
    chunk: int,
) -> tuple[jax.Array, jax.Array]:
    """`next_token_loss` from the final hidden state, the head applied `chunk` tokens at a time.

    head_fn(h_BCD, chunk_index) -> float32 logits [B, C, V] (the index lets it draw per-chunk
    dropout). A `lax.scan` over the chunks with `jax.checkpoint` around each: the forward
    keeps one chunk's logits at a time, and the backward recomputes them chunk by chunk
    instead of storing all of them as residuals (the price: the head's forward matmul runs
    twice). A length that `chunk` does not divide gets its last chunk padded with weight-0
    positions; a length of at most `chunk` is one plain `next_token_loss`.
    """
    batch, length = labels.shape
    if length <= chunk:  # one chunk holds no less than full logits: skip the recompute
        return next_token_loss(head_fn(hidden_BTD, jnp.zeros((), jnp.int32)), labels, weights)
    num_chunks = -(-length // chunk)
    pad = num_chunks * chunk - length

    def by_chunk(x):  # [B, T, ...] -> [N, B, C, ...], zero-padded to N * C positions
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(batch, num_chunks, chunk, *x.shape[2:]), 1, 0)

    @jax.checkpoint
    def chunk_loss(h_BCD, labels_BC, weights_BC, index):
        logits_BCV = head_fn(h_BCD, index)
        loss_sum, _ = causal_lm_loss(logits_BCV, labels_BC, weights_BC)
        return loss_sum, jnp.argmax(logits_BCV, axis=-1)

    def body(total, xs):
        loss_sum, predictions_BC = chunk_loss(*xs)
        return total + loss_sum, predictions_BC

    xs = (by_chunk(hidden_BTD), by_chunk(labels), by_chunk(weights), jnp.arange(num_chunks))
    total, predictions_NBC = lax.scan(body, jnp.zeros((), jnp.float32), xs)
    predictions = jnp.moveaxis(predictions_NBC, 0, 1).reshape(batch, num_chunks * chunk)
    return total, predictions[:, :length]


def pixel_classification_loss(
    logits_BHWC: jax.Array,
    labels_BHW: jax.Array,
    weights_B: jax.Array,
    *,
    ignore_index: int,
) -> tuple[jax.Array, jax.Array]:
    """Semantic segmentation: (sum over rows of weight x the row's mean cross-entropy over
    its counted pixels, per-row confusion matrices [B, C, C] float32 of the counted pixels,
    true class x predicted class).

    A pixel labelled `ignore_index` (or outside 0..C-1) counts for nothing; a row without a
    counted pixel adds 0. Per-row means keep the sum additive over rows, microbatches and
    hosts, as the steps need; the confusion matrices let an eval accumulate IoU over the
    whole split on a few numbers per image (counts are exact up to 2^24 pixels per image).
    """
    classes = logits_BHWC.shape[-1]
    counted = (labels_BHW != ignore_index) & (labels_BHW >= 0) & (labels_BHW < classes)
    logits = logits_BHWC.astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(
        logits, jnp.where(counted, labels_BHW, 0)
    )
    pixels_B = jnp.sum(counted, axis=(1, 2)).astype(jnp.float32)
    per_row = jnp.sum(jnp.where(counted, losses, 0.0), axis=(1, 2)) / jnp.maximum(pixels_B, 1.0)
    true_BHWC = jax.nn.one_hot(jnp.where(counted, labels_BHW, -1), classes, dtype=jnp.float32)
    predicted_BHWC = jax.nn.one_hot(jnp.argmax(logits, axis=-1), classes, dtype=jnp.float32)
    confusion_BCC = jnp.einsum("bhwt,bhwp->btp", true_BHWC, predicted_BHWC)
    return jnp.sum(per_row * weights_B), confusion_BCC
