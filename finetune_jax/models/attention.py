"""Attention masks and scaled dot-product attention shared by the model files."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def additive_attention_mask(attention_mask_BL: jax.Array) -> jax.Array:
    """[B, L] 0/1 key mask -> [B, 1, 1, L] float32 bias to add to attention scores.

    Like HF, masked keys get the most negative float32 rather than -inf, so a row whose
    keys are all masked (pure padding) softmaxes to a uniform row instead of NaN.
    """
    keep_B11L = attention_mask_BL[:, None, None, :].astype(jnp.float32)
    return (1.0 - keep_B11L) * jnp.finfo(jnp.float32).min


def attention_mask(
    attention_mask_BL: jax.Array | None,
    segment_ids_BL: jax.Array | None,
    length: int,
    window: int | None = None,
    shared_keys: int = 0,
) -> jax.Array | None:
    """Boolean mask [B|1, 1, L, L] (True = may attend) to apply on top of causality.

    Padding (0 in `attention_mask_BL`) hides keys; packing lets a token see only keys of its
    own segment, and the first `shared_keys` keys (prompt tuning's virtual tokens) whatever
    their segment; a sliding window keeps keys with query index - key index < `window`
    (HF's rule). Returns None when nothing limits attention beyond causality.
    """
    mask = None
    if attention_mask_BL is not None:
        mask = attention_mask_BL.astype(bool)[:, None, None, :]
    if segment_ids_BL is not None:
        same_B1LL = segment_ids_BL[:, None, :, None] == segment_ids_BL[:, None, None, :]
        if shared_keys:
            same_B1LL = same_B1LL | (jnp.arange(length) < shared_keys)[None, None, None, :]
        mask = same_B1LL if mask is None else mask & same_B1LL
    if window is not None:
        index_L = jnp.arange(length)
        near_11LL = (index_L[:, None] - index_L[None, :] < window)[None, None]
        mask = near_11LL if mask is None else mask & near_11LL
    return mask


def attend(q_BTNH, k_BSKH, v_BSKH, mask_B1TS=None, *, is_causal=True, implementation=None):
    """Scaled dot-product attention with grouped-query heads (N a multiple of K).

    `mask_B1TS` (bool, True = may attend) adds padding / packing / window limits to the
    causal one. `is_causal` assumes query i and key i are the same token; a KV cache
    (queries offset into longer keys) passes `is_causal=False` and its own causal mask.
    `implementation`: None computes it here with XLA ops, any other value goes to
    `jax.nn.dot_product_attention` (e.g. "cudnn" for its fused GPU kernel).
    """
    if implementation is not None:
        return jax.nn.dot_product_attention(
            q_BTNH,
            k_BSKH,
            v_BSKH,
            mask=mask_B1TS,
            is_causal=is_causal,
            implementation=implementation,
        )
    return _attend_xla(q_BTNH, k_BSKH, v_BSKH, mask_B1TS, is_causal)


def _attend_xla(q_BTNH, k_BSKH, v_BSKH, mask_B1TS, is_causal):
    """`jax.nn.dot_product_attention`'s XLA path (same masking, float32 softmax), with the
    query scaled before the score matmul (as flax's attention does; exact for the usual
    power-of-two 1/sqrt(head_dim)) and grouped K/V heads repeated rather than vmapped. On
    XLA:CPU the library's form materialised the scale as a full [B, N, T, S] operand and
    copied the probabilities to a transposed layout: Whisper tiny.en's 1,500-frame encoder
    took 4.41 s per 8 clips, 3.58 s this way (transformers: 2.0 s)."""
    groups = q_BTNH.shape[2] // k_BSKH.shape[2]
    scale = jnp.asarray(q_BTNH.shape[3] ** -0.5, jnp.float32)
    q_BTNH = (q_BTNH.astype(jnp.float32) * scale).astype(q_BTNH.dtype)
    if groups > 1:  # each K/V head serves `groups` query heads
        k_BSKH = jnp.repeat(k_BSKH, groups, axis=2)
        v_BSKH = jnp.repeat(v_BSKH, groups, axis=2)
    logits_BNTS = jnp.einsum("btnh,bsnh->bnts", q_BTNH, k_BSKH, preferred_element_type=jnp.float32)
    keep = None
    if is_causal:
        keep = jnp.tril(jnp.ones(logits_BNTS.shape[-2:], bool))
    if mask_B1TS is not None:
        keep = mask_B1TS if keep is None else keep & mask_B1TS
    if keep is not None:
        # A large negative rather than -inf: a row with no key left is uniform, not NaN.
        large_negative = -0.7 * jnp.finfo(jnp.float32).max
        logits_BNTS = jnp.where(keep, logits_BNTS, large_negative)
    probs_BNTS = jax.nn.softmax(logits_BNTS, axis=-1).astype(v_BSKH.dtype)
    return jnp.einsum("bnts,bsnh->btnh", probs_BNTS, v_BSKH)


def cache_attention_mask(
    attention_mask_BS: jax.Array | None,
    cache_index: jax.Array | int,
    length: int,
    slots: int,
    window: int | None = None,
) -> jax.Array:
    """Boolean mask [B|1, 1, T, S] (True = may attend) of T queries at slots
    `cache_index ...` over S cache slots: key slot <= query slot, slot distance < `window`,
    and keys valid in `attention_mask_BS` (None: all valid).

    A query still sees its own slot when that slot is invalid (a padding token): no row is
    then fully masked, since a fused kernel may return NaN for one, and a NaN v written
    into the cache would reach real rows as 0 * NaN.
    """
    query_T1 = (cache_index + jnp.arange(length))[:, None]
    key_1S = jnp.arange(slots)[None, :]
    mask_TS = key_1S <= query_T1
    if window is not None:
        mask_TS &= query_T1 - key_1S < window
    if attention_mask_BS is None:
        return mask_TS[None, None]
    if attention_mask_BS.shape[-1] != slots:
        raise ValueError(
            f"With a KV cache attention_mask marks the valid cache slots: shape [B, {slots}] "
            f"expected, got {attention_mask_BS.shape}"
        )
    valid_B1TS = attention_mask_BS.astype(bool)[:, None, None, :] | (key_1S == query_T1)
    return mask_TS[None, None] & valid_B1TS


def window_masks(
    windows: set[int | None],
    attention_mask_BL: jax.Array | None,
    segment_ids_BL: jax.Array | None,
    length: int,
    slots: int | None = None,
    cache_index: jax.Array | int | None = None,
    shared_keys: int = 0,
) -> dict[int | None, jax.Array | None]:
    """One mask per distinct sliding window (None: full attention): `attention_mask`'s
    without a KV cache (`shared_keys`: see there), `cache_attention_mask`'s over `slots`
    cache slots with one."""
    if slots is None:
        return {
            w: attention_mask(attention_mask_BL, segment_ids_BL, length, w, shared_keys)
            for w in windows
        }
    if segment_ids_BL is not None:
        raise ValueError("segment_ids (packing) cannot be combined with a KV cache")
    return {
        w: cache_attention_mask(attention_mask_BL, cache_index, length, slots, w) for w in windows
    }


def stack_window_masks(
    masks: dict[int | None, jax.Array | None], windows: list[int | None]
) -> tuple[jax.Array | None, jax.Array | None]:
    """What a scan over layers with these `windows` needs of `window_masks`' result: (the
    mask, None) when all layers share one, else (the distinct masks stacked [W, ...], each
    layer's index into them [L]) -- a mask per window, not per layer. A None mask (causality
    alone) is stacked as all True, which `attend`'s causal masking makes equivalent."""
    if len(masks) == 1:
        return next(iter(masks.values())), None
    order = list(masks)
    shape = jnp.broadcast_shapes(*(m.shape for m in masks.values() if m is not None))
    stack = jnp.stack(
        [jnp.ones(shape, bool) if m is None else jnp.broadcast_to(m, shape) for m in masks.values()]
    )
    return stack, jnp.asarray([order.index(w) for w in windows], jnp.int32)
