"""How updates land in bfloat16 storage (`optim.bf16_rounding`): the step, not the storage,
is where bf16 training loses accuracy.

An AdamW update is often below half a bf16 ulp of its weight (lr 1e-4 on a weight of 0.05:
a relative change of 2e-3 against bf16's 3.9e-3 spacing), so rounding `p + u` to the nearest
bf16 value drops it, every step, and the weight never moves. The same happens to the second
moment's `0.001 * g**2` increment. Three ways to store the result, chosen per run:

- `nearest`: plain round-to-nearest (what `p + u` in bf16 does).
- `stochastic`: round up with probability equal to the fraction of the ulp the exact value
  passed (Zamirai et al. 2020): unbiased, so small updates survive in expectation; no extra
  memory. Applied to bf16 params and to bf16 AdamW moments (`scale_by_adam`: computed in
  float32, rounded once). The random bits come from counters in the optimizer state, so a
  resumed run draws the same bits as an unbroken one.
- `kahan`: a bf16 compensation buffer per bf16 param keeps what rounding dropped and adds it
  back next step (Kahan summation, as the `optimi` library does): deterministic, +2 bytes per
  trained param. bf16 moments are rounded stochastically.

float32 leaves are left alone by every mode, so a mode costs nothing where nothing is bf16.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from finetune_jax.training.element_index import flat_index

MODES = ("nearest", "stochastic", "kahan")
# What `optim.bf16_rounding="auto"` means when anything is stored in bf16 (chosen by the
# measurements in README "bf16 storage that trains like float32").
AUTO = "stochastic"


def resolve_mode(setting: str, param_dtype: Any, state_dtype: Any) -> str:
    """The rounding mode a run uses: `setting`, or for "auto" the measured default where
    params or moments are stored in bf16 ("nearest", i.e. nothing extra, where neither is)."""
    if setting == "auto":
        low = any(jnp.dtype(d).itemsize < 4 for d in (param_dtype, state_dtype))
        return AUTO if low else "nearest"
    if setting not in MODES:
        raise ValueError(f"optim.bf16_rounding={setting!r} is not one of auto, {', '.join(MODES)}")
    return setting


def _is_low(x: Any) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize < 4


def _mix(h: jax.Array) -> jax.Array:
    """murmur3's 32-bit finaliser: a bijection whose every output bit depends on every input
    bit, so consecutive counters give independent-looking bits."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def random_bits(shape: tuple[int, ...], seed: jax.Array) -> jax.Array:
    """uint32 bits for each element of `shape`: a hash of the element's index and `seed`.

    Elementwise (XLA fuses it into the update, and each device hashes only its own shard's
    indices), where `jax.random.bits`' threefry cost 1.6 s per 22.7M values on this 2-core
    CPU: more than the whole train step. Good enough for rounding, not for cryptography.
    """
    index = flat_index(shape)
    return _mix(index * jnp.uint32(0x9E3779B1) + _mix(seed.astype(jnp.uint32)))


def stochastic_round(x: jax.Array, dtype: Any, seed: jax.Array) -> jax.Array:
    """`x` (float32) rounded to `dtype` (bfloat16) up or down, in proportion to its distance.

    bf16 is float32's top 16 bits: adding uniform random bits to the 16 bits that are cut
    off, then cutting them, rounds up exactly when the random value passes the cut part.
    """
    dtype = jnp.dtype(dtype)
    if dtype != jnp.bfloat16:
        return x.astype(dtype)
    x = x.astype(jnp.float32)
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    noise = random_bits(x.shape, seed) >> 16
    rounded = jax.lax.bitcast_convert_type((bits + noise) & jnp.uint32(0xFFFF0000), jnp.float32)
    # inf / nan keep their value (the carry would turn the largest finite value into inf,
    # which round-to-nearest does too, so only non-finite inputs need the guard).
    return jnp.where(jnp.isfinite(x), rounded, x).astype(dtype)


def _leaf_seeds(seed: jax.Array, tree: Any) -> Any:
    """One seed per leaf of `tree`: leaves with equal shapes get different bits."""
    leaves, treedef = jax.tree.flatten(tree)
    return jax.tree.unflatten(
        treedef,
        [_mix(seed + jnp.uint32(0x9E3779B9 * (i + 1) & 0xFFFFFFFF)) for i in range(len(leaves))],
    )


def cast_floating(tree: Any, dtype: Any) -> Any:
    """`tree` with its floating leaves in `dtype` (counters and other integers kept)."""
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
    )


class RoundingState(NamedTuple):
    """The inner optimizer's state, the step counter the random bits come from, and the
    Kahan compensation (a tree of bf16 arrays shaped like the bf16 params; () otherwise)."""

    inner: Any
    count: jax.Array
    compensation: Any


def scale_by_adam(
    b1: float, b2: float, eps: float, state_dtype: Any, seed: int
) -> optax.GradientTransformation:
    """`optax.scale_by_adam` whose moments are stored in `state_dtype`, rounded
    stochastically into bf16, and whose update is computed from the moments as stored.

    Each moment is computed in float32 from its stored value and the gradient, rounded once
    (its random bits drawn from `seed` and the step count, so a resumed run draws the same
    bits), and the update reads the rounded moments. Reading what was stored, rather than
    the exact float32 moments, is what keeps the step free of float32 copies: each moment's
    new value is written over its old one, and the param's update reads only the new
    values (measured in README "bf16 storage that trains like float32"). The state is
    `optax.ScaleByAdamState`, so checkpoints have the tree `optax.adamw`'s have.
    """
    state_dtype = jnp.dtype(state_dtype)
    base_seed = _mix(jnp.uint32(seed & 0xFFFFFFFF) ^ jnp.uint32(0x5BD1E995))

    def init(params: Any) -> optax.ScaleByAdamState:
        zeros = lambda p: jnp.zeros(p.shape, state_dtype)  # noqa: E731
        return optax.ScaleByAdamState(
            jnp.zeros([], jnp.int32), jax.tree.map(zeros, params), jax.tree.map(zeros, params)
        )

    def update(updates: Any, state: optax.ScaleByAdamState, params: Any = None):
        del params
        count = optax.safe_increment(state.count)
        key = _mix(base_seed ^ _mix(count.astype(jnp.uint32)))

        def moment(decay: float, power: int):
            def step(g: jax.Array, m: jax.Array, k: jax.Array) -> jax.Array:
                exact = decay * m.astype(jnp.float32) + (1 - decay) * g.astype(jnp.float32) ** power
                return stochastic_round(exact, state_dtype, k)

            return step

        mu = jax.tree.map(moment(b1, 1), updates, state.mu, _leaf_seeds(key, updates))
        nu = jax.tree.map(moment(b2, 2), updates, state.nu, _leaf_seeds(_mix(key + 1), updates))
        steps = count.astype(jnp.float32)
        mu_unbias, nu_unbias = 1 - b1**steps, 1 - b2**steps
        updates = jax.tree.map(
            lambda m, v: (
                (m.astype(jnp.float32) / mu_unbias)
                / (jnp.sqrt(v.astype(jnp.float32) / nu_unbias) + eps)
            ),
            mu,
            nu,
        )
        return updates, optax.ScaleByAdamState(count, mu, nu)

    return optax.GradientTransformation(init, update)


def rounded(
    inner: optax.GradientTransformation, mode: str, seed: int
) -> optax.GradientTransformation:
    """`inner` (an AdamW) whose updates land in bf16 params by `mode` ("stochastic" or
    "kahan"; "nearest" needs no wrapper). `inner` stores its own state (`scale_by_adam`).

    The returned updates are float32 `new_p - p`, exact differences of two bf16 values, so
    `optax.apply_updates` (which adds in float32 and casts back) lands on `new_p` exactly.
    """
    if mode not in ("stochastic", "kahan"):
        raise ValueError(f"rounded() takes 'stochastic' or 'kahan', got {mode!r}")
    base_seed = jnp.uint32(seed & 0xFFFFFFFF)

    def init(params: Any) -> RoundingState:
        compensation = ()
        if mode == "kahan":
            # MaskedNode where a param is float32: no buffer, and the sharding code (which
            # gives param-shaped state its param's sharding) leaves it alone.
            compensation = jax.tree.map(
                lambda p: jnp.zeros_like(p) if _is_low(p) else optax.transforms.MaskedNode(),
                params,
            )
        return RoundingState(inner.init(params), jnp.zeros([], jnp.int32), compensation)

    def update(updates: Any, state: RoundingState, params: Any = None):
        param_key = _mix(base_seed ^ _mix(state.count.astype(jnp.uint32)))
        updates, inner_state = inner.update(updates, state.inner, params)
        compensation = state.compensation
        if mode == "stochastic":
            updates = jax.tree.map(
                lambda u, p, k: _stochastic_update(u, p, k) if _is_low(p) else u,
                updates,
                params,
                _leaf_seeds(param_key, params),
            )
        elif mode == "kahan":
            # Two maps over the same sums (XLA computes them once): a map returning pairs
            # would need to tell its pairs from the MaskedNode tuples of other groups.
            kahan = lambda part: (
                lambda u, p, c: (  # noqa: E731
                    _kahan_update(u, p, c)[part] if _is_low(p) else (u, c)[part]
                )
            )
            updates, compensation = (
                jax.tree.map(kahan(0), updates, params, compensation),
                jax.tree.map(kahan(1), updates, params, compensation),
            )
        return updates, RoundingState(inner_state, state.count + 1, compensation)

    return optax.GradientTransformation(init, update)


def _stochastic_update(u: jax.Array, p: jax.Array, key: jax.Array) -> jax.Array:
    p32 = p.astype(jnp.float32)
    new_p = stochastic_round(p32 + u.astype(jnp.float32), p.dtype, key)
    return new_p.astype(jnp.float32) - p32


def _kahan_update(u: jax.Array, p: jax.Array, c: jax.Array) -> tuple[jax.Array, jax.Array]:
    p32 = p.astype(jnp.float32)
    exact = p32 + (u.astype(jnp.float32) + c.astype(jnp.float32))
    new_p = exact.astype(p.dtype).astype(jnp.float32)
    return new_p - p32, (exact - new_p).astype(c.dtype)
