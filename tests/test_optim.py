import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from finetune_jax import tree_paths
from finetune_jax.config import base_config
from finetune_jax.models import bert, llama
from finetune_jax.training import builder, optim, rules
from tests.test_sft_train import tiny_sft_config

N_LAYERS = 3


def bert_like_params():
    rng = np.random.default_rng(0)
    layer = lambda: {
        "attention": {
            "query": {
                "kernel": rng.normal(size=(8, 2, 4)).astype(np.float32),
                "bias": np.zeros((2, 4), np.float32),
            }
        },
        "output": {"LayerNorm": {"scale": np.ones(8, np.float32), "bias": np.zeros(8, np.float32)}},
    }
    return {
        "bert": {
            "embeddings": {
                "word_embeddings": {"embedding": rng.normal(size=(50, 8)).astype(np.float32)}
            },
            "encoder": {f"layer_{i}": layer() for i in range(N_LAYERS)},
            "pooler": {
                "dense": {
                    "kernel": rng.normal(size=(8, 8)).astype(np.float32),
                    "bias": np.zeros(8, np.float32),
                }
            },
        },
        "classifier": {
            "kernel": rng.normal(size=(8, 2)).astype(np.float32),
            "bias": np.zeros(2, np.float32),
        },
    }


def optim_config(**kw):
    """optim defaults with BERT's head and layer regex (what 'auto' means for BERT)."""
    config = base_config().optim
    config.head, config.layer = bert.FAMILY.head.trained, bert.FAMILY.layer_pattern
    config.unlock()
    for k, v in kw.items():
        config[k] = v
    return config


def labels_by_path(groups):
    return dict(zip(tree_paths.param_paths(groups.labels), jax.tree.leaves(groups.labels)))


def multiplier_by_path(groups):
    return {p: groups.multipliers[label] for p, label in labels_by_path(groups).items()}


@pytest.mark.parametrize(
    "preset,expected_trainable",
    [
        ("full", lambda p: True),
        ("linear_probe", lambda p: p.startswith(("classifier/", "bert/pooler/"))),
        ("bitfit", lambda p: p.startswith(("classifier/", "bert/pooler/")) or p.endswith("/bias")),
        (
            "top_k_layers",
            lambda p: p.startswith(
                ("classifier/", "bert/pooler/", "bert/encoder/layer_1/", "bert/encoder/layer_2/")
            ),
        ),
    ],
)
def test_presets_select_trainable_params(preset, expected_trainable):
    groups = optim.param_groups(optim_config(preset=preset, top_k=2), bert_like_params())
    for path, mult in multiplier_by_path(groups).items():
        assert (mult is not None) == expected_trainable(path), path


def test_lora_preset_trains_lora_params_and_head_only():
    params = bert_like_params()
    query = params["bert"]["encoder"]["layer_1"]["attention"]["query"]
    query["lora_a"], query["lora_b"] = np.zeros((8, 2), np.float32), np.zeros((2, 2, 4), np.float32)
    groups = optim.param_groups(optim_config(preset="lora"), params)
    for path, mult in multiplier_by_path(groups).items():
        expected = path.startswith(("classifier/", "bert/pooler/")) or "/lora_" in path
        assert (mult is not None) == expected, path


def test_llrd_multipliers_decay_with_depth():
    decay = 0.5
    groups = optim.param_groups(optim_config(preset="llrd", llrd_decay=decay), bert_like_params())
    mults = multiplier_by_path(groups)
    assert mults["classifier/kernel"] == 1.0
    for i in range(N_LAYERS):
        assert mults[f"bert/encoder/layer_{i}/attention/query/kernel"] == pytest.approx(
            decay ** (N_LAYERS - i)
        )
    assert mults["bert/embeddings/word_embeddings/embedding"] == pytest.approx(
        decay ** (N_LAYERS + 1)
    )


def test_layer_presets_work_with_any_layer_regex():
    # The layer rules come from the paths optim.layer matches, not from editing its text:
    # a regex with a non-capturing group before the index works like the default.
    layer = r"(?:bert|roberta)/encoder/layer_(\d+)/.*"
    top = optim.param_groups(
        optim_config(preset="top_k_layers", top_k=1, layer=layer), bert_like_params()
    )
    for path, mult in multiplier_by_path(top).items():
        expected = path.startswith(("classifier/", "bert/pooler/", "bert/encoder/layer_2/"))
        assert (mult is not None) == expected, path
    llrd = optim.param_groups(
        optim_config(preset="llrd", llrd_decay=0.5, layer=layer), bert_like_params()
    )
    mults = multiplier_by_path(llrd)
    for i in range(N_LAYERS):
        assert mults[f"bert/encoder/layer_{i}/output/LayerNorm/scale"] == pytest.approx(
            0.5 ** (N_LAYERS - i)
        )


def test_nothing_trainable_is_an_error():
    with pytest.raises(
        ValueError, match=r"optim.preset='linear_probe' \(optim.head=''\) leaves no"
    ):
        optim.param_groups(optim_config(preset="linear_probe", head=""), bert_like_params())


def test_explicit_rules_and_unmatched_param_error():
    config = optim_config(
        preset="rules", rules=((r"classifier/.*", "trainable"), (r".*/layer_2/.*", 0.1))
    )
    with pytest.raises(rules.RuleError, match="bert/embeddings/word_embeddings/embedding"):
        optim.param_groups(config, bert_like_params())
    config = optim_config(
        preset="rules", rules=((r"classifier/.*", "trainable"), (".*", "sideways"))
    )
    with pytest.raises(ValueError, match="'sideways'"):
        optim.param_groups(config, bert_like_params())


def test_no_weight_decay_on_biases_and_layernorm():
    groups = optim.param_groups(optim_config(), bert_like_params())
    decay = {p: groups.decay[label] for p, label in labels_by_path(groups).items()}
    assert decay["classifier/kernel"] and decay["bert/encoder/layer_0/attention/query/kernel"]
    assert not decay["classifier/bias"]
    assert not decay["bert/encoder/layer_0/output/LayerNorm/scale"]


def trainable_count(groups, params):
    return sum(
        int(np.prod(p.shape))
        for p, t in zip(jax.tree.leaves(params), jax.tree.leaves(groups.trainable))
        if t
    )


def test_optimizer_state_scales_with_trainable_params_only():
    params = bert_like_params()
    state_bytes = {}
    for preset in ("full", "linear_probe"):
        groups = optim.param_groups(optim_config(preset=preset), params)
        tx, _ = optim.make_optimizer(optim_config(preset=preset), groups, total_steps=10)
        state_bytes[preset] = optim.tree_bytes(tx.init(params))
        moments = 2 * 4 * trainable_count(groups, params)  # adam mu + nu in float32
        # Beyond the moments only per-group step counters (a few bytes each) may exist.
        assert moments <= state_bytes[preset] <= moments + 64 * len(groups.multipliers)
    assert state_bytes["linear_probe"] < state_bytes["full"] / 4


def test_frozen_params_do_not_move_and_clipping_ignores_their_gradients():
    params = jax.tree.map(jnp.asarray, bert_like_params())
    config = optim_config(
        preset="linear_probe",
        clip_norm=1.0,
        weight_decay=0.0,
        warmup_fraction=0.0,
        schedule="constant",
    )
    groups = optim.param_groups(config, params)
    tx, _ = optim.make_optimizer(config, groups, total_steps=10)
    small = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)
    # Huge gradients on frozen leaves only: with clipping over trainable leaves they change nothing.
    huge = jax.tree.map(lambda g, t: g if t else g * 1e9, small, groups.trainable)
    updates_small, _ = tx.update(small, tx.init(params), params)
    updates_huge, _ = tx.update(huge, tx.init(params), params)
    for u_small, u_huge, t in zip(
        jax.tree.leaves(updates_small),
        jax.tree.leaves(updates_huge),
        jax.tree.leaves(groups.trainable),
    ):
        np.testing.assert_array_equal(u_small, u_huge)
        if not t:
            assert not np.any(np.asarray(u_huge))
    new = optax.apply_updates(params, updates_huge)
    for p, q, t in zip(
        jax.tree.leaves(params), jax.tree.leaves(new), jax.tree.leaves(groups.trainable)
    ):
        assert np.array_equal(p, q) != t


def test_schedule_warms_up_then_decays_to_zero():
    config = optim_config(lr=1e-3, warmup_fraction=0.1, schedule="linear")
    lr = optim.schedule(config, total_steps=100)
    assert float(lr(0)) == 0.0
    assert float(lr(10)) == pytest.approx(1e-3)
    assert float(lr(55)) == pytest.approx(0.5e-3, rel=1e-5)
    assert float(lr(100)) == pytest.approx(0.0, abs=1e-12)
    cosine = optim.schedule(optim_config(lr=1e-3, warmup_fraction=0.0, schedule="cosine"), 100)
    assert float(cosine(50)) == pytest.approx(0.5e-3, rel=1e-5)


def test_group_table_counts_every_param():
    params = bert_like_params()
    groups = optim.param_groups(optim_config(preset="bitfit"), params)
    table = optim.group_table(groups, params)
    total = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    assert f"/ {total:,}" in table and "frozen" in table


def test_group_table_warns_about_rules_that_decide_nothing():
    params = bert_like_params()
    config = optim_config(
        preset="rules",
        rules=((r"classifier/.*", "trainable"), (r"clasifier/.*", 0.5), (".*", "frozen")),
    )
    groups = optim.param_groups(config, params)
    assert groups.unused_rules == ("clasifier/.*",)
    assert "warning: optim.rules ['clasifier/.*'] decide no parameter" in optim.group_table(
        groups, params
    )
    assert optim.param_groups(optim_config(preset="bitfit"), params).unused_rules == ()


def stacked(tree):
    """bert_like_params-shaped tree with its layers stacked as `model.scan_layers` holds them."""
    encoder = tree["bert"]["encoder"]
    layers = [encoder[f"layer_{i}"] for i in range(N_LAYERS)]
    rest = {**tree["bert"], "encoder": {"layer": jax.tree.map(lambda *x: jnp.stack(x), *layers)}}
    return {**tree, "bert": rest}


STACKS = {"bert/encoder/layer": N_LAYERS}


@pytest.mark.parametrize(
    "preset", [dict(preset="top_k_layers", top_k=1), dict(preset="llrd", llrd_decay=0.5)]
)
def test_stacked_layers_resolve_rules_per_layer_and_step_like_unrolled(preset):
    """Rules see a stacked leaf's per-layer paths; layers that disagree form a per-layer
    group whose update equals the unrolled layers' updates, clipping included: huge
    gradients on frozen layers of a stacked leaf change nothing, as on frozen leaves."""
    params = jax.tree.map(jnp.asarray, bert_like_params())
    config = optim_config(clip_norm=1.0, warmup_fraction=0.0, schedule="constant", **preset)
    groups = optim.param_groups(config, params)
    stacked_groups = optim.param_groups(config, stacked(params), STACKS)
    per_layer = stacked_groups.per_layer
    assert per_layer and all(len(g.multipliers) == N_LAYERS for g in per_layer.values())
    assert optim.param_counts(stacked_groups, stacked(params)) == optim.param_counts(groups, params)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-2), params)
    if preset["preset"] == "top_k_layers":  # frozen layers 0 and 1: gradients no one reads
        for i in range(N_LAYERS - 1):
            layer = grads["bert"]["encoder"][f"layer_{i}"]
            grads["bert"]["encoder"][f"layer_{i}"] = jax.tree.map(lambda g: g * 1e9, layer)
    updates = []
    for g, p, gr in ((groups, params, grads), (stacked_groups, stacked(params), stacked(grads))):
        tx, _ = optim.make_optimizer(config, g, total_steps=10)
        updates.append(tx.update(gr, tx.init(p), p)[0])
    for path, expected, actual in zip(
        tree_paths.param_paths(updates[1]),
        jax.tree.leaves(stacked(updates[0])),
        jax.tree.leaves(updates[1]),
    ):
        np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-12, err_msg=path)
    table = optim.group_table(stacked_groups, stacked(params))
    assert f"({N_LAYERS} layers, stacked)" in table


def test_per_layer_groups_store_moments_in_state_dtype():
    """optim.state_dtype holds for the per-layer AdamW of stacked leaves too."""
    params = stacked(jax.tree.map(jnp.asarray, bert_like_params()))
    config = optim_config(preset="llrd", llrd_decay=0.5, state_dtype="bfloat16")
    groups = optim.param_groups(config, params, STACKS)
    assert groups.per_layer
    tx, _ = optim.make_optimizer(config, groups, total_steps=10)
    state = tx.init(params)
    _, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    floats = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floats and {x.dtype for x in floats} == {jnp.dtype(jnp.bfloat16)}


def test_auto_values_are_the_familys_own(tiny_chat_llama_dir):
    """optim.head / optim.layer / peft.targets default to the model family's values, so the
    llrd preset works on a Llama config as written (it needs `layers_<i>`, not `layer_<i>`)."""
    config = base_config()
    assert (config.optim.head, config.optim.layer, config.peft.targets) == ("auto",) * 3
    token = builder.with_family_defaults(config, bert.FAMILY.with_head("token_classification"))
    assert token.optim.head == "classifier/.*" and config.optim.head == "auto"  # a copy
    sft = tiny_sft_config(tiny_chat_llama_dir)
    sft.optim.preset, sft.optim.llrd_decay, sft.peft.rank = "llrd", 0.5, 0
    setup = builder.build(sft)
    assert setup.config.optim.layer == llama.FAMILY.layer_pattern
    mults = multiplier_by_path(setup.groups)
    depth = {p: int(p.split("/layers_")[1].split("/")[0]) for p in mults if "/layers_" in p}
    layers = max(depth.values()) + 1
    assert layers >= 2
    for path, i in depth.items():  # layer i of N at decay ** (N - i)
        assert mults[path] == pytest.approx(0.5 ** (layers - i)), path
