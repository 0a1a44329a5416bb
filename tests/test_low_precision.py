"""bf16 storage that trains like float32: stochastic rounding and Kahan-compensated updates
keep the small updates round-to-nearest drops, shard and resume like the rest of the state,
and leave float32 runs exactly as they were."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from finetune_jax.config import base_config
from finetune_jax.train import train
from finetune_jax.training import low_precision, optim
from tests.helpers import final_state, run_steps, tiny_config, train_losses

BF16 = jnp.bfloat16


def test_stochastic_rounding_is_unbiased_and_lands_on_the_two_neighbours():
    # 1 + 2**-10 lies an eighth of the way from bf16's 1.0 to its next value 1 + 2**-7.
    x = jnp.full((100_000,), 1 + 2**-10, jnp.float32)
    rounded = np.asarray(low_precision.stochastic_round(x, BF16, jnp.uint32(0)), np.float32)
    assert set(np.unique(rounded)) == {1.0, 1 + 2**-7}
    # The mean of 100k draws of a Bernoulli(1/8) step: within 5 standard errors.
    up = np.mean(rounded > 1)
    assert abs(up - 1 / 8) < 5 * np.sqrt(1 / 8 * 7 / 8 / x.size)


def test_representable_and_nonfinite_values_are_kept():
    x = jnp.array([0.0, -2.0, 1.5, 3.0e38, jnp.inf, -jnp.inf, jnp.nan], jnp.float32)
    out = low_precision.stochastic_round(x, BF16, jnp.uint32(1)).astype(jnp.float32)
    expected = x.astype(BF16).astype(jnp.float32)  # all but 3e38 are exact in bf16
    np.testing.assert_array_equal(np.asarray(out[:3]), np.asarray(expected[:3]))
    assert np.isinf(out[4]) and out[4] > 0 and np.isinf(out[5]) and out[5] < 0
    assert np.isnan(out[6])


def _sgd_run(mode: str, steps: int, delta: float) -> np.ndarray:
    """`steps` SGD updates of +delta on bf16 ones and a float32 leaf, landed by `mode`."""
    params = {"w": jnp.ones((4096,), BF16), "f32": jnp.ones((3,), jnp.float32)}
    grads = jax.tree.map(lambda p: jnp.full(p.shape, -delta, p.dtype), params)
    tx = optax.sgd(1.0)
    if mode != "nearest":
        tx = low_precision.rounded(tx, mode, seed=0)
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(steps):
        params, state = step(params, state)
    assert params["w"].dtype == BF16
    # The float32 leaf is untouched by every mode: plain float32 SGD.
    np.testing.assert_allclose(np.asarray(params["f32"]), 1 + steps * delta, rtol=1e-5)
    return np.asarray(params["w"], np.float32)


@pytest.mark.parametrize("mode", ["stochastic", "kahan"])
def test_updates_below_half_an_ulp_survive(mode):
    # 1e-4 is 1/78 of bf16's spacing at 1.0: round-to-nearest drops every one of them.
    exact = 1 + 200 * 1e-4
    assert np.all(_sgd_run("nearest", 200, 1e-4) == 1.0)
    w = _sgd_run(mode, 200, 1e-4)
    ulp = 2**-7
    if mode == "kahan":  # deterministic: the bf16 value nearest the exact sum
        assert np.all(np.abs(w - exact) <= ulp / 2)
    else:  # unbiased: a random walk around the exact sum, whose mean lands on it
        # Each step moves a weight one ulp with probability p = 1/78: after 200 steps its
        # spread is sqrt(200 p (1 - p)) = 1.6 ulp, the mean of 4096 weights' 0.025 ulp.
        assert np.all(np.abs(w - exact) <= 8 * ulp)
        assert abs(w.mean() - exact) < ulp / 10


def test_adam_with_float32_moments_is_optax_adam():
    grads = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)}
    ours, theirs = (
        low_precision.scale_by_adam(0.9, 0.99, 1e-8, "float32", 0),
        optax.scale_by_adam(0.9, 0.99, 1e-8),
    )
    a, b = ours.init(grads), theirs.init(grads)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for step in range(3):
        g = jax.tree.map(lambda x: x * (step + 1), grads)
        (ua, a), (ub, b) = ours.update(g, a), theirs.update(g, b)
        np.testing.assert_allclose(ua["w"], ub["w"], rtol=1e-6)


def _update_temp_bytes(rounding: str) -> int:
    """XLA's scratch for one optimizer step on bf16 params and moments (donated)."""
    config = base_config().optim
    config.state_dtype = "bfloat16"
    params = {f"w{i}": jax.ShapeDtypeStruct((64, 1024), BF16) for i in range(4)}
    groups = optim.param_groups(config, params)
    tx, _ = optim.make_optimizer(config, groups, 10, rounding, seed=0)

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = jax.eval_shape(tx.init, params)
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, params).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_stochastic_rounding_updates_in_place_like_plain_bf16():
    # Each moment is written over its old value and the params read the new moments: no
    # float32 copy of params or moments exists during the step (with the exact float32
    # moments feeding the update, XLA kept 1.5x the params' float32 size here).
    param_bytes = 4 * 64 * 1024 * 2
    assert _update_temp_bytes("stochastic") <= _update_temp_bytes("nearest") + param_bytes // 8


def test_auto_rounds_only_where_something_is_stored_in_bf16():
    resolve = low_precision.resolve_mode
    assert resolve("auto", "float32", "float32") == "nearest"
    assert resolve("auto", "bfloat16", "float32") == low_precision.AUTO
    assert resolve("auto", "float32", "bfloat16") == low_precision.AUTO
    assert resolve("kahan", "float32", "float32") == "kahan"
    with pytest.raises(ValueError, match=r"optim.bf16_rounding='kahn' is not one of auto"):
        resolve("kahn", "bfloat16", "bfloat16")


def _optimizer_state(param_dtype: str, rounding: str, state_dtype: str = "float32"):
    config = base_config().optim
    config.bf16_rounding, config.state_dtype = rounding, state_dtype
    params = {"dense": {"kernel": jnp.ones((4, 3), param_dtype), "bias": jnp.ones((3,))}}
    groups = optim.param_groups(config, params)
    rounding = low_precision.resolve_mode(rounding, param_dtype, state_dtype)
    tx, _ = optim.make_optimizer(config, groups, 10, rounding, seed=0)
    return tx, params, tx.init(params)


def test_float32_runs_keep_their_optimizer_state_as_it_was():
    # "auto" in float32 adds nothing: the same state tree (and so the same checkpoints) as
    # an optimizer built without rounding.
    _, _, state = _optimizer_state("float32", "auto")
    _, _, plain = _optimizer_state("float32", "nearest")
    assert jax.tree.structure(state) == jax.tree.structure(plain)
    assert not any(
        isinstance(x, low_precision.RoundingState)
        for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, tuple))
    )


def test_kahan_keeps_a_bf16_buffer_for_bf16_params_only():
    _, params, state = _optimizer_state("bfloat16", "kahan", state_dtype="bfloat16")
    rounding = [
        x
        for x in jax.tree.leaves(
            state, is_leaf=lambda x: isinstance(x, low_precision.RoundingState)
        )
        if isinstance(x, low_precision.RoundingState)
    ]
    buffers = [leaf for r in rounding for leaf in jax.tree.leaves(r.compensation)]
    # The kernel is bf16 (a buffer); the bias is float32 (none).
    assert [(b.shape, b.dtype) for b in buffers] == [((4, 3), BF16)]
    moments = [x for r in rounding for x in jax.tree.leaves(r.inner) if x.ndim > 0]
    assert moments and all(m.dtype == BF16 for m in moments)


def bf16_config(model_dir, data_dir, rounding: str) -> ml_collections.ConfigDict:
    config = tiny_config(model_dir, data_dir)
    config.model.param_dtype = config.optim.state_dtype = "bfloat16"
    config.optim.bf16_rounding = rounding
    return config


# The default mode in the default run; the other one with the slow checks.
MODES_DEFAULT_FIRST = [
    low_precision.AUTO,
    *(
        pytest.param(mode, marks=pytest.mark.slow)
        for mode in ("stochastic", "kahan")
        if mode != low_precision.AUTO
    ),
]


@pytest.mark.parametrize("rounding", MODES_DEFAULT_FIRST)
def test_bf16_run_resumes_bitwise(tiny_bert_dir, sst2_slice, tmp_path, rounding):
    config = bf16_config(tiny_bert_dir, sst2_slice, rounding)
    train(config, str(tmp_path / "straight"))
    train(config, str(tmp_path / "resumed"), until_step=3)
    train(config, str(tmp_path / "resumed"))
    a, b = final_state(config, tmp_path / "straight"), final_state(config, tmp_path / "resumed")
    assert int(a.step) == int(b.step) == 6
    leaves = jax.tree.leaves(a)
    assert any(x.dtype == BF16 for x in leaves)
    for x, y in zip(leaves, jax.tree.leaves(b)):
        assert np.array_equal(x, y)
    assert train_losses(tmp_path / "straight") == train_losses(tmp_path / "resumed")


@pytest.mark.parametrize("preset", ["llrd", pytest.param("lora", marks=pytest.mark.slow)])
def test_llrd_and_lora_train_their_bf16_params_with_rounding(tiny_bert_dir, sst2_slice, preset):
    # Per-layer groups (llrd on stacked layers) and LoRA leaves go through the same wrapper.
    config = bf16_config(tiny_bert_dir, sst2_slice, "kahan")
    config.optim.preset = preset
    config.model.scan_layers = preset == "llrd"
    config.peft.rank = 4 if preset == "lora" else 0
    exp, state, losses = run_steps(config, 2)
    assert np.all(np.isfinite(losses))
    before, after = jax.tree.leaves(exp.initial_state().params), jax.tree.leaves(state.params)
    assert all(x.dtype == BF16 for x in after if jnp.issubdtype(x.dtype, jnp.floating))
    assert any(not np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(before, after))


def test_a_misspelt_mode_stops_the_run_before_anything_loads(tmp_path):
    from finetune_jax.training import builder

    config = base_config()
    config.model.name = str(tmp_path / "no_such_model")  # would fail later, when it loads
    config.optim.bf16_rounding = "stocastic"
    with pytest.raises(ValueError, match="optim.bf16_rounding='stocastic'"):
        builder.build(config)
