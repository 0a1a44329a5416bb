"""TrainState: the whole of a run's mutable state, as plain data.

No functions live inside, so the state tree, the checkpoint tree and the sharding tree are
the same tree. Per-step randomness is `fold_in(rng, step)`, which also makes resume exact.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates applied so far
    params: Any
    opt_state: Any
    rng: jax.Array  # base key; dropout for step s uses fold_in(rng, s)


def create_train_state(params: Any, tx: optax.GradientTransformation, seed: int) -> TrainState:
    """Fresh state around (already loaded) params, with the optimizer state for `tx`."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.key_data(jax.random.key(seed)),
    )
