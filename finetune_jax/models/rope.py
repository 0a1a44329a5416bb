"""Rotary position embeddings (RoPE), HF-compatible, with HF's linear / dynamic / llama3 scaling."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


def rope_inverse_frequencies(
    head_dim: int,
    theta: float,
    rope_scaling: Mapping[str, Any] | None = None,
    max_position_embeddings: int | None = None,
    seq_len: jax.Array | int | None = None,
) -> jax.Array:
    """float32 [head_dim // 2] inverse frequencies of rotary embeddings, HF-compatible.

    `rope_scaling` holds HF's rope parameters without `rope_theta` (None: plain RoPE). Only
    "dynamic" (NTK) depends on `seq_len`, the largest position + 1 of the current batch; like
    HF it changes nothing until `seq_len` exceeds `max_position_embeddings`.
    """
    scaling = dict(rope_scaling or {})
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"Unsupported rope_type {rope_type!r}; supported: {ROPE_TYPES}")
    # float32 throughout, like torch, so frequencies match HF to the last bit or two.
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    if rope_type == "dynamic":
        seq_len = jnp.maximum(jnp.asarray(seq_len, jnp.float32), max_position_embeddings)
        factor = scaling["factor"]
        ratio = factor * seq_len / max_position_embeddings - (factor - 1)
        base = theta * ratio ** (head_dim / (head_dim - 2))
        return 1.0 / (base ** jnp.asarray(exponents))
    inv_freq = np.float32(1.0) / (np.float32(theta) ** exponents)
    if rope_type == "linear":
        inv_freq = inv_freq / np.float32(scaling["factor"])
    elif rope_type == "llama3":
        inv_freq = _llama3_inverse_frequencies(inv_freq, scaling)
    return jnp.asarray(inv_freq, jnp.float32)


def _llama3_inverse_frequencies(inv_freq: np.ndarray, scaling: Mapping[str, Any]) -> np.ndarray:
    """Llama 3.1 frequency-dependent scaling: long wavelengths / factor, short ones kept."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelen = np.float32(2 * np.pi) / inv_freq
    scaled = np.where(wavelen > old_context / low, inv_freq / np.float32(factor), inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / np.float32(factor) + smooth * scaled
    is_medium = ~(wavelen < old_context / high) & ~(wavelen > old_context / low)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(
    positions_BL: jax.Array, inv_freq_K: jax.Array, dtype: Any
) -> tuple[jax.Array, jax.Array]:
    """cos and sin [B, L, 2K] for integer positions, computed in float32, returned in `dtype`.

    The angles repeat once (`[f, f]`), matching the rotate-half convention of `apply_rope`.
    """
    angles_BLK = positions_BL[..., None].astype(jnp.float32) * inv_freq_K.astype(jnp.float32)
    angles_BLH = jnp.concatenate([angles_BLK, angles_BLK], axis=-1)
    return jnp.cos(angles_BLH).astype(dtype), jnp.sin(angles_BLH).astype(dtype)


def apply_rope(x_BLNH: jax.Array, cos_BLH: jax.Array, sin_BLH: jax.Array) -> jax.Array:
    """Rotates x [B, L, heads, H] by position, HF's rotate-half layout (dim i pairs i + H/2)."""
    half = x_BLNH.shape[-1] // 2
    rotated_BLNH = jnp.concatenate([-x_BLNH[..., half:], x_BLNH[..., :half]], axis=-1)
    return x_BLNH * cos_BLH[:, :, None, :] + rotated_BLNH * sin_BLH[:, :, None, :]
