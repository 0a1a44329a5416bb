"""IA3's maths (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and
Cheaper than In-Context Learning"; HF PEFT's `IA3Config`): a learned vector, initialised to
ones, that rescales a frozen projection.

- On keys and values (and any target that is not feed-forward) it scales the layer's
  output, bias included: `y = (x W + b) * l`, at `<layer>/ia3_scale`.
- On feed-forward layers (PEFT's `feedforward_modules`: the MLP's down / output projection)
  it scales the layer's input: `y = (x * l) W + b`, at `<layer>/ia3_input_scale`.

Like PEFT's `ia3_l` ((out, 1) or (1, in) against a torch weight [out, in]), the vector is
stored at a shape that broadcasts against the kernel [*in, *out]: [1, .., 1, *out] for an
output scale, [*in, 1, .., 1] for an input scale. Folding it into the kernel (`fold`) is then
one product, stacked (scanned) layers included. Neither form makes autodiff build a gradient
with respect to W: dL/dl needs only the layer's output (or its input's gradient).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

SCALE, INPUT_SCALE = "ia3_scale", "ia3_input_scale"  # param leaf names


def scale_shape(kernel_shape: tuple[int, ...], in_axes: int, scales_input: bool) -> tuple:
    """The stored shape of a scale of this kernel (see the module docstring)."""
    ones_in, ones_out = (1,) * in_axes, (1,) * (len(kernel_shape) - in_axes)
    if scales_input:
        return (*kernel_shape[:in_axes], *ones_out)
    return (*ones_in, *kernel_shape[in_axes:])


@functools.partial(jax.jit, static_argnames="scales_input")
def fold(
    kernel: jax.Array, bias: jax.Array | None, scale: jax.Array, scales_input: bool
) -> tuple[jax.Array, jax.Array | None]:
    """(kernel, bias) with the scale folded in (float32); the bias changes only under an
    output scale, exactly as the layer computes `(x W + b) * l`. Jitted, as `dora.fold`."""
    kernel = kernel.astype(jnp.float32) * scale.astype(jnp.float32)
    if scales_input or bias is None:
        return kernel, bias
    return kernel, bias.astype(jnp.float32) * scale.astype(jnp.float32).reshape(bias.shape)
