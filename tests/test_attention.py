"""`attention.attend`'s own XLA path equals `jax.nn.dot_product_attention` (the library's
XLA implementation): grouped-query heads, causal and padding / packing masks, a query whose
keys are all masked, cached decoding (fewer queries than keys), float32 and bfloat16."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from finetune_jax.models import attention


def _qkv(dtype, batch=2, queries=7, keys=7, heads=4, kv_heads=2, head_dim=8):
    rq, rk, rv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(rq, (batch, queries, heads, head_dim), dtype)
    k = jax.random.normal(rk, (batch, keys, kv_heads, head_dim), dtype)
    v = jax.random.normal(rv, (batch, keys, kv_heads, head_dim), dtype)
    return q, k, v


def _padding_and_packing_mask(batch: int, length: int) -> jax.Array:
    keep_BL = np.ones((batch, length), np.int32)
    keep_BL[1, 4:] = 0  # row 1: three padding keys
    segments_BL = np.array([[1, 1, 1, 2, 2, 2, 2], [1, 1, 1, 1, 0, 0, 0]])
    mask = attention.attention_mask(jnp.asarray(keep_BL), jnp.asarray(segments_BL), length)
    return mask.at[0, 0, 5].set(False)  # query 5 of row 0 sees no key at all


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("is_causal", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_attend_equals_jax_dot_product_attention(dtype, tol, is_causal, masked):
    q, k, v = _qkv(dtype)
    mask = _padding_and_packing_mask(2, 7) if masked else None
    ours = attention.attend(q, k, v, mask, is_causal=is_causal)
    theirs = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal)
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    np.testing.assert_allclose(
        np.asarray(ours, np.float32), np.asarray(theirs, np.float32), atol=tol, rtol=tol
    )


def test_attend_with_fewer_queries_than_keys_and_its_gradient():
    """A decode step (1 query over 9 cached keys, padded keys masked) and the gradients
    of a loss through it: those of the library's form."""
    q, k, v = _qkv(jnp.float32, queries=1, keys=9)
    mask = jnp.asarray(np.arange(9) < np.array([[6], [9]]))[:, None, None, :]

    def loss(fn, q, k, v):
        return jnp.sum(jnp.sin(fn(q, k, v, mask)))

    ours = lambda q, k, v, m: attention.attend(q, k, v, m, is_causal=False)  # noqa: E731
    theirs = lambda q, k, v, m: jax.nn.dot_product_attention(q, k, v, mask=m)  # noqa: E731
    np.testing.assert_allclose(ours(q, k, v, mask), theirs(q, k, v, mask), atol=1e-6)
    for a, b in zip(
        jax.grad(loss, argnums=(1, 2, 3))(ours, q, k, v),
        jax.grad(loss, argnums=(1, 2, 3))(theirs, q, k, v),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, atol=1e-5)
