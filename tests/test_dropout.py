"""layers.Dropout: nn.Dropout's contract with 16-bit draws (two per 32-bit random word)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from finetune_jax.models import layers


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.37])
@pytest.mark.parametrize("shape", [(64, 40, 384), (33, 7, 101)])  # even and odd last dims
def test_keeps_each_element_with_its_probability_and_is_unbiased(rate, shape):
    x = jnp.ones(shape)
    y = layers.Dropout(rate).apply({}, x, False, rngs={"dropout": jax.random.key(0)})
    kept = np.asarray(y != 0)
    n, p = kept.size, 1 - rate
    assert abs(kept.mean() - p) < 5 * np.sqrt(p * (1 - p) / n)  # 5 sigma of a binomial
    assert abs(float(y.mean()) - 1.0) < 5 * np.sqrt(rate / (p * n))  # E[y] = x
    # Kept values carry the exact inverse of the (2^-16-rounded) keep probability.
    np.testing.assert_allclose(np.unique(np.asarray(y)[kept]), 65536 / round(p * 65536))


def test_draws_are_independent_across_the_paired_halves():
    """The two 16-bit halves of one random word decide neighbouring elements: they must not
    agree more often than independent draws would."""
    mask = np.asarray(layers.keep_mask(jax.random.key(1), (4096, 256), 0.5))
    agree = (mask[:, 0::2] == mask[:, 1::2]).mean()
    assert abs(agree - 0.5) < 5 * np.sqrt(0.25 / (4096 * 128))


def test_deterministic_rate_zero_rate_one_and_broadcast_dims():
    x = jnp.arange(24.0).reshape(2, 3, 4) + 1
    rngs = {"dropout": jax.random.key(2)}
    np.testing.assert_array_equal(layers.Dropout(0.5).apply({}, x, True, rngs=rngs), x)
    np.testing.assert_array_equal(layers.Dropout(0.0).apply({}, x, False, rngs=rngs), x)
    np.testing.assert_array_equal(layers.Dropout(1.0).apply({}, x, False, rngs=rngs), 0 * x)
    y = layers.Dropout(0.5, broadcast_dims=(1, 2)).apply({}, x, False, rngs=rngs)
    for row_x, row_y in zip(np.asarray(x), np.asarray(y)):  # a whole row kept or dropped
        assert np.all(row_y == 0) or np.allclose(row_y, 2 * row_x)


def test_mask_is_the_same_whatever_the_sharding():
    """Threefry draws by element index, so a sharded mask equals the unsharded one (what
    keeps one-device and 8-device runs identical)."""
    mesh = jax.make_mesh((jax.device_count(),), ("x",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
    key = jax.random.key(3)
    shape = (8 * jax.device_count(), 10)
    plain = layers.keep_mask(key, shape, 0.9)
    sharded = jax.jit(lambda k: layers.keep_mask(k, shape, 0.9), out_shardings=sharding)(key)
    np.testing.assert_array_equal(plain, sharded)
