"""Big-model contracts on 8 fake devices: a Llama (GQA, kv heads on `tensor`, packed rows, LoRA)
trains under fsdp / tensor meshes as on one device, and under fsdp=8 no full-size copy of a
sharded param or optimizer moment ever lives on one device while building, loading,
creating the state or stepping."""

import jax
import numpy as np
import pytest

from finetune_jax import config as config_lib
from finetune_jax.hf import loading, model_files
from finetune_jax.models import family_for
from finetune_jax.training import builder
from tests.helpers import run_steps
from tests.multidevice.test_meshes import assert_trees_close
from tests.test_sft_train import tiny_sft_config

STEPS = 3


def sft_mesh_config(model_dir, mesh, **overrides):
    overrides = {"train.batch_size": 8, "optim.lr": 1e-3, **overrides}
    config = tiny_sft_config(model_dir, **overrides)
    for axis, size in {"data": 1, "fsdp": 1, "tensor": 1, **mesh}.items():
        config.mesh[axis] = size
    return config


@pytest.fixture(scope="module")
def one_device_llama(tiny_chat_llama_dir):
    _, state, losses = run_steps(sft_mesh_config(tiny_chat_llama_dir, {}), STEPS, jax.devices()[:1])
    return jax.device_get(state), losses


@pytest.mark.parametrize(
    "mesh", [{"fsdp": 8}, {"fsdp": 4, "tensor": 2}], ids=["fsdp8", "fsdp4-tensor2"]
)
def test_llama_lora_sft_sharded_matches_one_device(tiny_chat_llama_dir, one_device_llama, mesh):
    ref_state, ref_losses = one_device_llama
    config = sft_mesh_config(tiny_chat_llama_dir, mesh)
    assert config.data.packing and config.peft.rank > 0
    exp, state, losses = run_steps(config, STEPS, jax.devices())
    assert exp.model_config.num_key_value_heads == 2  # GQA: kv heads split over tensor=2
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    # Adam moves a param by lr * m / sqrt(v): another summation order changes a tiny
    # gradient's m / sqrt(v) in its 4th digit, so params agree to ~1e-4 * lr absolute
    # (LoRA's B starts at zero: a relative bound alone cannot hold there).
    assert_trees_close(state.params, ref_state.params, atol=1e-3 * config.optim.lr)
    assert_trees_close(state.opt_state, ref_state.opt_state)


def _sharded_shapes(setup) -> set[tuple[int, ...]]:
    """Full shapes of the params (and so of their Adam moments) that fsdp splits, except
    shapes some unsplit param also has."""
    leaves = jax.tree.leaves(setup.abstract_params)
    split = {x.shape for x in leaves if x.sharding.shard_shape(x.shape) != x.shape}
    return split - {x.shape for x in leaves if x.sharding.shard_shape(x.shape) == x.shape}


def _assert_no_full_copy(shapes, where):
    for array in jax.live_arrays():
        for shard in array.addressable_shards:
            assert shard.data.shape not in shapes, (
                f"{where}: a full {shard.data.shape} copy of a sharded param or moment "
                f"lives on {shard.device}"
            )


def test_fsdp_never_holds_a_full_sharded_array_on_one_device(tiny_chat_llama_dir, monkeypatch):
    overrides = {"peft.rank": 0, "optim.preset": "full"}
    setup = builder.build(sft_mesh_config(tiny_chat_llama_dir, {"fsdp": 8}, **overrides))
    shapes = _sharded_shapes(setup)
    assert len(shapes) >= 5  # embedding, attention and MLP kernels are all split
    _assert_no_full_copy(shapes, "build")
    placed = []
    real_place, real_put = loading._place, jax.device_put

    def place(host, sharding):  # after every tensor streamed in
        array = real_place(host, sharding)
        _assert_no_full_copy(shapes, "loading")
        placed.append(array.shape)
        return array

    def device_put(*args, **kwargs):  # an eager, unsharded value about to be spread out
        _assert_no_full_copy(shapes, "device_put")
        return real_put(*args, **kwargs)

    monkeypatch.setattr(loading, "_place", place)
    monkeypatch.setattr(jax, "device_put", device_put)
    state = setup.initial_state()
    _assert_no_full_copy(shapes, "initial state")
    state, _ = setup.train_step(state, setup.put_batch(next(setup.data.train_batches())))
    jax.block_until_ready(state)
    _assert_no_full_copy(shapes, "first step")
    assert len(placed) == len(jax.tree.leaves(setup.abstract_params))


def test_fsdp_splits_the_vocabulary_so_no_device_gathers_the_embedding(tiny_chat_llama_dir):
    """The `vocab` rule puts the (tied) embedding's vocabulary on fsdp: its lookup, the LM
    head and the loss then reduce over the split vocabulary instead of gathering the whole
    [vocab, embed] matrix (or its gradient) on every device."""
    overrides = {"peft.rank": 0, "optim.preset": "full"}
    config = sft_mesh_config(tiny_chat_llama_dir, {"fsdp": 8}, **overrides)
    setup = builder.build(config)
    table = setup.abstract_params["model"]["embed_tokens"]["embedding"]
    assert table.sharding.shard_shape(table.shape) == (table.shape[0] // 8, table.shape[1])
    spec = setup.kind.batch_spec(config, setup.task)
    batch = {
        name: jax.ShapeDtypeStruct(shape, dtype, sharding=setup.batch_sharding)
        for name, (shape, dtype) in spec.items()
    }
    hlo = setup.train_step.lower(setup.abstract_state(), batch).compile().as_text()
    vocab, embed = table.shape
    for full in (f"[{vocab},{embed}]", f"[{embed},{vocab}]"):
        assert full not in hlo, f"the compiled step holds a whole {full} embedding on a device"


def test_a_vocabulary_fsdp_does_not_divide_falls_to_the_next_rule(tiny_bert_dir):
    """BERT's 30,522-token vocabulary does not split 8 ways: its embedding takes the next
    `vocab` rule (tensor) and splits its embed dim over fsdp, as the rules list."""
    from finetune_jax.cluster import sharding  # noqa: PLC0415

    mesh = jax.make_mesh((1, 8, 1), ("data", "fsdp", "tensor"))
    hf_config = model_files.read_config(str(tiny_bert_dir))
    family = family_for(hf_config["model_type"])
    model_config = loading.model_config(family, hf_config, tiny_bert_dir)
    boxed = jax.eval_shape(lambda rng: family.init_params(model_config, rng), jax.random.key(0))
    rules = sharding.logical_rules(config_lib.base_config())
    specs = sharding.param_shardings(boxed, mesh, rules)
    word = specs["bert"]["embeddings"]["word_embeddings"]["embedding"].spec
    assert tuple(word) == ("tensor", "fsdp")
