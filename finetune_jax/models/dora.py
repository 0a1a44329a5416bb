"""DoRA's maths (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation"; HF PEFT's
`use_dora=True`): a LoRA layer whose adapted weight is split into a trained magnitude and a
direction,

    W' = m * (W + s A B) / ||W + s A B||

with the norm taken per output feature over the input dims (a torch Linear weight's row
norm, `torch.linalg.norm(weight, dim=1)`, as PEFT computes it), `m` [*out] initialised to
||W|| (so a fresh adapter, B = 0, changes nothing) and trained with A and B.

As in PEFT (and section 4.3 of the paper) the norm is treated as a constant in the backward
pass (`jax.lax.stop_gradient`): the layer then computes `m / ||.|| * (x W + s (x A) B)`, and
autodiff never forms the full dL/dW nor a gradient through the [in, out] norm. The forward
pass does form `W + s A B` once per step to take its norm (in*out*r multiply-adds, as PEFT).

`layers.DenseND` holds the magnitude next to its kernel (`<layer>/lora_magnitude`, the
kernel's output-dim logical names); these functions are the array maths only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def weight_norm(
    kernel: jax.Array, delta: jax.Array | None, in_axes: int, first: int = 0
) -> jax.Array:
    """||kernel + delta|| over the `in_axes` input dims (from dim `first`: 1 past a stacked
    layer axis), per output feature, in float32. `delta`: s A B at the kernel's shape, or
    None (zero)."""
    w = kernel.astype(jnp.float32)
    if delta is not None:
        w = w + delta.astype(jnp.float32)
    return jnp.sqrt(jnp.sum(jnp.square(w), axis=tuple(range(first, first + in_axes))))


def low_rank_product(a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """s A [*in, r] @ B [r, *out] at the kernel's shape, at full float32 precision."""
    product = jnp.tensordot(
        a.astype(jnp.float32), b.astype(jnp.float32), axes=1, precision=jax.lax.Precision.HIGHEST
    )
    return scale * product


def magnitude_scale(
    magnitude: jax.Array, kernel: jax.Array, a: jax.Array, b: jax.Array, scale: float, in_axes: int
) -> jax.Array:
    """m / ||W + s A B|| [*out] (float32), the norm a constant to autodiff (as PEFT's
    `weight_norm.detach()`): gradients reach m here and A, B through the update only."""
    norm = weight_norm(kernel, low_rank_product(a, b, scale), in_axes)
    return magnitude.astype(jnp.float32) / jax.lax.stop_gradient(norm)


@functools.partial(jax.jit, static_argnames="stacked")
def fold(kernel: jax.Array, delta: jax.Array, magnitude: jax.Array, stacked: bool) -> jax.Array:
    """The merged kernel m * (W + delta) / ||W + delta|| (float32), `delta` = s A B at the
    kernel's shape; `stacked`: all three carry a leading layer axis. Jitted: a program per
    kernel shape rather than one per op."""
    in_axes = kernel.ndim - magnitude.ndim
    w = kernel.astype(jnp.float32) + delta.astype(jnp.float32)
    ratio = magnitude.astype(jnp.float32) / weight_norm(w, None, in_axes, first=int(stacked))
    if stacked:  # [L, *out] -> [L, 1, .., 1, *out] against [L, *in, *out]
        ratio = ratio.reshape(ratio.shape[:1] + (1,) * in_axes + ratio.shape[1:])
    return w * ratio
