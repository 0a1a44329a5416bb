"""Each element's flat (row-major) position, as an array computed where the elements are."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def flat_index(shape: tuple[int, ...]) -> jax.Array:
    """uint32 [shape]: each element's row-major flat position, mod 2**32.

    Built from per-axis iotas rather than `arange(size).reshape(shape)`: elementwise, so under
    a sharding each device computes its own shard's positions (a reshape of a flat iota would
    gather them), and XLA fuses it into whatever consumes it (random bits for stochastic
    rounding, position-weighted checksums).
    """
    index, stride = jnp.zeros(shape, jnp.uint32), 1
    for axis in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride)
        stride = stride * shape[axis] % 2**32
    return index
