"""Sharded training on 8 fake CPU devices equals 1-device training (the chunked causal-LM loss
too); FSDP really shards; checkpoints move between meshes."""

import jax
import numpy as np
import pytest

from finetune_jax.training import builder, checkpoints
from tests.helpers import run_steps, tiny_config
from tests.test_sft_train import tiny_sft_config

STEPS = 4


def mesh_config(model_dir, data_dir, mesh):
    config = tiny_config(model_dir, data_dir)
    for axis, size in {"data": 1, "fsdp": 1, "tensor": 1, **mesh}.items():
        config.mesh[axis] = size
    return config


def assert_trees_close(a, b, rtol=1e-5, atol=1e-8):
    """Per leaf: max |a - b| <= rtol * max |b| (+ atol for leaves that are pure rounding noise,
    like the attention key bias, whose gradient is mathematically zero)."""
    flat_a = jax.tree_util.tree_flatten_with_path(jax.device_get(a))[0]
    for (path, x), y in zip(flat_a, jax.tree.leaves(jax.device_get(b))):
        diff = float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
        scale = float(np.max(np.abs(y)))
        assert diff <= rtol * scale + atol, (jax.tree_util.keystr(path), diff, scale)


@pytest.fixture(scope="module")
def single_device_run(tiny_bert_dir, sst2_slice):
    config = mesh_config(tiny_bert_dir, sst2_slice, {})
    _, state, losses = run_steps(config, STEPS, jax.devices()[:1])
    return jax.device_get(state), losses


@pytest.mark.parametrize(
    "mesh",
    [{"data": 8}, {"fsdp": 8}, {"data": 2, "fsdp": 2, "tensor": 2}],
    ids=["data8", "fsdp8", "data2-fsdp2-tensor2"],
)
def test_sharded_training_matches_one_device(tiny_bert_dir, sst2_slice, single_device_run, mesh):
    ref_state, ref_losses = single_device_run
    _, state, losses = run_steps(mesh_config(tiny_bert_dir, sst2_slice, mesh), STEPS, jax.devices())
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert_trees_close(state.params, ref_state.params)
    assert_trees_close(state.opt_state, ref_state.opt_state)


def test_chunked_lm_loss_sharded_matches_one_device(tiny_chat_llama_dir):
    # The LM head per chunk of the sequence (a scan over chunks) under data + fsdp + tensor
    # sharding: the vocab-split head and the batch-split chunks give one device's numbers.
    runs = []
    for mesh, devices in (({}, jax.devices()[:1]), ({"data": 2, "fsdp": 2, "tensor": 2}, None)):
        config = tiny_sft_config(tiny_chat_llama_dir)
        for axis, size in {"data": 1, "fsdp": 1, "tensor": 1, **mesh}.items():
            config.mesh[axis] = size
        _, state, losses = run_steps(config, 2, devices)
        runs.append((jax.device_get(state.params), losses))
    (ref_params, ref_losses), (params, losses) = runs
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    # 1e-4: Adam at this config's lr 1e-2 turns reduction-order noise in a near-zero LoRA
    # gradient into ~1e-5 of a param (the full-logits form shows the same).
    assert_trees_close(params, ref_params, rtol=1e-4)


def test_fsdp_holds_an_eighth_of_params_and_optimizer_state(tiny_bert_dir, sst2_slice):
    exp, state, _ = run_steps(mesh_config(tiny_bert_dir, sst2_slice, {"fsdp": 8}), 1, jax.devices())
    embedding = state.params["bert"]["embeddings"]["word_embeddings"]["embedding"]
    kernel = state.params["bert"]["encoder"]["layer_0"]["intermediate"]["kernel"]
    for array in (embedding, kernel):
        shards = array.addressable_shards
        assert len(shards) == 8
        assert all(s.data.size * 8 == array.size for s in shards)
    # Adam's moments follow their param's sharding: find mu for the embedding by shape.
    moments = [
        x
        for x in jax.tree.leaves(state.opt_state)
        if hasattr(x, "shape") and x.shape == embedding.shape
    ]
    assert len(moments) == 2  # mu and nu
    for moment in moments:
        assert all(s.data.size * 8 == moment.size for s in moment.addressable_shards)


def test_kahan_buffers_shard_like_their_param(tiny_bert_dir, sst2_slice):
    config = mesh_config(tiny_bert_dir, sst2_slice, {"fsdp": 8})
    config.model.param_dtype = config.optim.state_dtype = "bfloat16"
    config.optim.bf16_rounding = "kahan"
    _, state, losses = run_steps(config, 1, jax.devices())
    assert np.isfinite(losses[0])
    embedding = state.params["bert"]["embeddings"]["word_embeddings"]["embedding"]
    same_shape = [
        x
        for x in jax.tree.leaves(state.opt_state)
        if hasattr(x, "shape") and x.shape == embedding.shape
    ]
    assert len(same_shape) == 3  # mu, nu and the compensation
    for array in same_shape:
        assert all(s.data.size * 8 == array.size for s in array.addressable_shards)


def test_checkpoint_moves_between_meshes(tiny_bert_dir, sst2_slice, tmp_path):
    exp8, state, _ = run_steps(
        mesh_config(tiny_bert_dir, sst2_slice, {"data": 8}), 2, jax.devices()
    )
    manager = checkpoints.make_manager(str(tmp_path), 1, None, async_save=False)
    checkpoints.save(manager, state, {"data": {}})
    manager.wait_until_finished()
    saved = jax.device_get(state)
    for mesh, devices in (({"data": 2, "fsdp": 4}, jax.devices()), ({}, jax.devices()[:1])):
        exp = builder.build(mesh_config(tiny_bert_dir, sst2_slice, mesh), devices=devices)
        restored, _ = checkpoints.restore_latest(manager, exp.abstract_state())
        leaf = restored.params["bert"]["embeddings"]["word_embeddings"]["embedding"]
        assert leaf.sharding.mesh.shape == exp.mesh.shape
        for x, y in zip(jax.tree.leaves(jax.device_get(restored)), jax.tree.leaves(saved)):
            assert np.array_equal(x, y)


def test_slim_checkpoint_moves_between_meshes(tiny_bert_dir, sst2_slice, tmp_path):
    """A LoRA state saved slim on fsdp=8 restores on other meshes: the frozen params are
    streamed into the new shardings, with the same checksums (and digest) on every mesh."""

    def lora(mesh):
        config = mesh_config(tiny_bert_dir, sst2_slice, mesh)
        config.peft.rank, config.optim.preset = 4, "lora"
        return config

    exp8, state, _ = run_steps(lora({"fsdp": 8}), 2, jax.devices())
    record = exp8.frozen_record(state.params)
    manager = checkpoints.make_manager(str(tmp_path), 1, None, async_save=False)
    checkpoints.save(manager, state, {"data": {}}, frozen=record)
    manager.wait_until_finished()
    saved = jax.device_get(state)
    for mesh, devices in (({"data": 2, "fsdp": 4}, jax.devices()), ({}, jax.devices()[:1])):
        exp = builder.build(lora(mesh), devices=devices)
        restored, _ = exp.restore_latest(manager)
        assert exp.frozen_record(restored.params) == record
        frozen = restored.params["bert"]["encoder"]["layer_0"]["intermediate"]["kernel"]
        assert frozen.sharding.mesh.shape == exp.mesh.shape
        for x, y in zip(jax.tree.leaves(jax.device_get(restored)), jax.tree.leaves(saved)):
            assert np.array_equal(x, y)


def test_mesh_and_batch_errors_name_the_problem(tiny_bert_dir, sst2_slice):
    with pytest.raises(ValueError, match="does not divide the 8 devices"):
        builder.build(mesh_config(tiny_bert_dir, sst2_slice, {"data": 3}))
    config = mesh_config(tiny_bert_dir, sst2_slice, {"data": 8})
    config.train.batch_size = 12
    with pytest.raises(ValueError, match="batch_size=12.*8 devices"):
        builder.build(config)
    # A vocabulary of 30522 cannot be split 8 ways: the error names the param and its shape.
    with pytest.raises(ValueError, match=r"word_embeddings/embedding of shape \(30522, 32\)"):
        builder.build(mesh_config(tiny_bert_dir, sst2_slice, {"tensor": 8}))
