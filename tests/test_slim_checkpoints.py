"""Slim checkpoints (`train.checkpoint_frozen=False`): a LoRA run checkpoints what trains,
streams its frozen params from `model.name` again on resume / eval / export / predict,
resumes bitwise, refuses a source that changed, and still reads full checkpoints."""

from __future__ import annotations

import copy
import csv
import json
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from finetune_jax.eval import run_eval
from finetune_jax.export import export
from finetune_jax.hf import model_files
from finetune_jax.models import lora as lora_lib
from finetune_jax.predict import predict
from finetune_jax.train import train
from finetune_jax.training import builder, checkpoints, frozen_base, manifest
from tests.helpers import SHARED_DATA, tiny_config, train_losses
from tests.multidevice.test_two_processes import run_workers

FROZEN_KEY = "bert.encoder.layer.0.attention.self.key.weight"  # a frozen base tensor
RESUME_CHECKSUMS: list[int] = []  # one entry per checksum the `runs` fixture's resume computed


def lora_config(model_dir, data_dir):
    """The tiny BERT with LoRA (rank 4) and the pooler trained; the new classifier stays
    frozen as initialised from the seed (drawn again, not read, on restore). 4 steps of one
    batch shape, saved at steps 2 and 4, evaluated at the end."""
    config = tiny_config(model_dir, data_dir, max_steps=4, eval_every=0, checkpoint_every=2)
    config.data.buckets = (32,)
    config.peft.rank = 4
    config.optim.preset = "lora"
    config.optim.head = r"bert/pooler/.*"
    config.optim.lr = 1e-2
    return config


@pytest.fixture(scope="module")
def runs(tiny_bert_dir, sst2_slice, tmp_path_factory):
    """The same LoRA run twice: slim checkpoints, stopped after step 2 and resumed; full
    checkpoints (`train.checkpoint_frozen=True`: every param, no record: the layout of
    every checkpoint written before slim ones), straight to step 4."""
    root = tmp_path_factory.mktemp("slim_runs")
    config = lora_config(tiny_bert_dir, sst2_slice)
    train(config, str(root / "slim"), until_step=2)
    with pytest.MonkeyPatch.context() as patch:  # count the checksums the resume computes
        checksum = frozen_base.checksum
        patch.setattr(frozen_base, "checksum", lambda x: RESUME_CHECKSUMS.append(1) or checksum(x))
        train(config, str(root / "slim"))
    full = copy.deepcopy(config)
    full.train.checkpoint_frozen = True
    train(full, str(root / "full"))
    return config, root


def _saved_params(workdir, step):
    """{path: shape} of the params in the Orbax checkpoint's own metadata, and its bytes."""
    manager = checkpoints.make_manager(str(workdir), 2, None, read_only=True)
    try:
        tree = manager.item_metadata(step)[checkpoints.STATE].tree["params"]
    finally:
        checkpoints.close(manager)
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    paths = {"/".join(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}
    size = sum(f.stat().st_size for f in (workdir / "checkpoints" / str(step)).rglob("*"))
    return paths, size


def test_a_lora_checkpoint_holds_only_what_trains_and_is_much_smaller(runs):
    config, root = runs
    setup = builder.build(config)
    for step in (2, 4):
        slim, slim_bytes = _saved_params(root / "slim", step)
        full, full_bytes = _saved_params(root / "full", step)
        assert sorted(slim) == sorted(setup.trainable_paths)  # no frozen leaf
        assert sorted(full) == sorted(setup.trainable_paths + setup.frozen_paths)
        assert slim_bytes * 10 < full_bytes, (slim_bytes, full_bytes)
    manager = checkpoints.make_manager(str(root / "slim"), 2, None, read_only=True)
    record = checkpoints.frozen_record(manager, 4)
    checkpoints.close(manager)
    assert sorted(record["leaves"]) == sorted(setup.frozen_paths)
    assert record["source"] == str(config.model.name)
    # Each start names the same source and digest in the manifest.
    starts = manifest.read_manifest(str(root / "slim"))
    assert [s["frozen_base"]["digest"] for s in starts] == [record["digest"]] * 2
    assert [s["frozen_base"] for s in manifest.read_manifest(str(root / "full"))] == [None]


def test_a_resumed_slim_run_equals_a_straight_full_one_bitwise(runs, monkeypatch):
    config, root = runs
    assert train_losses(root / "slim") == train_losses(root / "full")
    setup = builder.build(config)
    read = []
    open_tensors = model_files.open_tensors

    def recording(model_ref):
        hf_config, tensors = open_tensors(model_ref)
        get = tensors.get
        tensors.get = lambda name: read.append(name) or get(name)
        return hf_config, tensors

    monkeypatch.setattr(model_files, "open_tensors", recording)
    states, reads = {}, {}
    for run in ("full", "slim"):
        manager = checkpoints.make_manager(str(root / run), 2, None, read_only=True)
        states[run], _ = setup.restore_latest(manager)
        checkpoints.close(manager)
        reads[run], read[:] = list(read), []
    assert int(states["slim"].step) == int(states["full"].step) == 4
    a, b = jax.device_get(states["slim"]), jax.device_get(states["full"])
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.array_equal(x, y)
    # A full checkpoint (as every one before slim ones) reads no weights; a slim one reads
    # the frozen base, not the trained pooler.
    assert reads["full"] == []
    assert FROZEN_KEY in reads["slim"] and "bert.pooler.dense.weight" not in reads["slim"]
    # The resume checksummed each streamed frozen param once (to check it), and its own
    # record reused that check rather than computing them again.
    manager = checkpoints.make_manager(str(root / "slim"), 2, None, read_only=True)
    assert len(RESUME_CHECKSUMS) == len(checkpoints.frozen_record(manager, 4)["leaves"])
    checkpoints.close(manager)
    # A run resumed from a full checkpoint records the base it holds: the same as the slim
    # run's, so its later slim checkpoints stream and check the same params.
    manager = checkpoints.make_manager(str(root / "slim"), 2, None, read_only=True)
    record = checkpoints.frozen_record(manager, 4)
    assert setup.frozen_record(states["full"].params)["digest"] == record["digest"]
    # The final eval restores an earlier step of its own run with the frozen params it holds.
    _, streamed = setup.restore_params(str(root / "slim"), "2")
    monkeypatch.setattr(model_files, "open_tensors", lambda ref: pytest.fail("streamed"))
    live = setup.checkpoint_params(manager, 2, states["slim"].params, record)
    checkpoints.close(manager)
    for x, y in zip(jax.tree.leaves(jax.device_get(live)), jax.tree.leaves(streamed)):
        assert np.array_equal(x, y)


def test_eval_export_and_predict_of_a_slim_checkpoint_equal_a_full_ones(runs, tmp_path):
    config, root = runs
    rows = (SHARED_DATA / "glue" / "sst2" / "dev.tsv").read_text().splitlines()[1:6]
    source = tmp_path / "new.csv"
    with open(source, "w", newline="") as f:
        csv.writer(f).writerows([["sentence"]] + [[r.split("\t")[0]] for r in rows])
    outputs = {}
    for run in ("slim", "full"):
        results = run_eval(config, str(root / run), "validation", which="4")
        export(config, str(root / run), str(tmp_path / run), which="4")
        predict(config, str(root / run), str(source), str(tmp_path / f"{run}.csv"), which="4")
        weights = safetensors.numpy.load_file(tmp_path / run / "model.safetensors")
        outputs[run] = results, weights, (tmp_path / f"{run}.csv").read_text()
    (slim_eval, slim_weights, slim_rows), (full_eval, full_weights, full_rows) = outputs.values()
    assert slim_eval == full_eval and slim_rows == full_rows
    assert sorted(slim_weights) == sorted(full_weights)
    for key, value in full_weights.items():
        np.testing.assert_array_equal(slim_weights[key], value, err_msg=key)


def test_a_slim_checkpoint_of_another_model_names_the_frozen_param_and_both_shapes(runs):
    config, root = runs
    setup = builder.build(config)
    manager = checkpoints.make_manager(str(root / "slim"), 2, None, read_only=True)
    record = checkpoints.frozen_record(manager, 4)
    path = "bert/encoder/layer_0/attention/key/kernel"  # frozen: in the record, not the state
    flat = lora_lib.flat_paths(setup.abstract_params)
    flat[path] = jax.ShapeDtypeStruct((32, 4, 4), flat[path].dtype)
    try:
        with pytest.raises(
            checkpoints.CheckpointError,
            match=rf"'{path}' has shape \(32, 4, 8\) in the checkpoint but \(32, 4, 4\)",
        ):
            checkpoints.check_compatible(manager, 4, lora_lib.nested(flat), record)
    finally:
        checkpoints.close(manager)


def _changed_copy(model_dir, out):
    """A copy of `model_dir` with one element of a frozen tensor changed."""
    shutil.copytree(model_dir, out)
    tensors = safetensors.numpy.load_file(out / "model.safetensors")
    tensors[FROZEN_KEY][0, 0] += 1e-3
    safetensors.numpy.save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def _files(workdir):
    return {p: p.read_bytes() for p in sorted(workdir.rglob("*")) if p.is_file()}


def test_a_changed_source_is_refused_naming_both_digests_and_nothing_is_touched(runs, tmp_path):
    config, root = runs
    workdir = tmp_path / "run"
    shutil.copytree(root / "slim", workdir)
    manager = checkpoints.make_manager(str(workdir), 2, None, read_only=True)
    saved = checkpoints.frozen_record(manager, 4)["digest"]
    checkpoints.close(manager)
    changed = copy.deepcopy(config)
    changed.model.name = str(_changed_copy(config.model.name, tmp_path / "changed"))
    changed.train.max_steps = 6  # resume, not "already finished"
    before = _files(workdir)
    with pytest.raises(frozen_base.SourceChangedError) as error:
        train(changed, str(workdir))
    message = str(error.value)
    now = message.split("now gives digest ")[1].split(" ")[0]
    assert saved in message and len(now) == 16 and now != saved
    assert str(config.model.name) in message and changed.model.name in message
    assert "attention/key/kernel" in message and "point model.name at" in message
    assert _files(workdir) == before  # checkpoints, config, manifest, metrics: untouched
    with pytest.raises(frozen_base.SourceChangedError, match=saved):
        run_eval(changed, str(workdir), "validation", which="latest")
    # The full checkpoint needs no source: the changed one does not matter to it.
    run_eval(changed, str(root / "full"), "validation", which="4")
    (tmp_path / "changed" / "model.safetensors").unlink()  # weights gone: said so, too
    with pytest.raises(checkpoints.CheckpointError, match="cannot be read.*point model.name"):
        run_eval(changed, str(workdir), "validation", which="latest")


@pytest.mark.slow  # two compiles of the random init (~15 s here); the default tests draw
# a frozen new head again instead (the fixture's classifier)
def test_frozen_params_born_from_the_seed_are_drawn_again_identically(tiny_bert_dir, sst2_slice):
    config = lora_config(tiny_bert_dir, sst2_slice)
    config.model.init = "random"  # every frozen param from the seed
    setup = builder.build(config)
    whole = setup.pretrained_params()
    frozen = setup.pretrained_params(only=setup.frozen_paths)
    record = setup.frozen_record(whole)
    assert sorted(record["leaves"]) == sorted(setup.frozen_paths)
    assert (
        frozen_base.record(setup.model_ref, lora_lib.flat_paths(frozen))["digest"]
        == record["digest"]
    )
    whole = lora_lib.flat_paths(whole)
    for path, value in lora_lib.flat_paths(frozen).items():
        assert np.array_equal(jax.device_get(value), jax.device_get(whole[path])), path


@pytest.mark.parametrize(
    "dtype", [jnp.float32, jnp.bfloat16, jnp.int8, jnp.uint8, ml_dtypes.float8_e4m3fn]
)
def test_the_checksum_sees_any_changed_or_swapped_element_of_any_dtype(dtype):
    values = np.arange(1, 13, dtype=np.float32).reshape(3, 4).astype(dtype)
    base = frozen_base.checksum(jnp.asarray(values))
    changed, swapped = values.copy(), values.copy()
    changed[2, 3] = changed[2, 2]
    swapped[0, 0], swapped[1, 0] = values[1, 0], values[0, 0]
    assert frozen_base.checksum(jnp.asarray(values)) == base  # deterministic
    assert frozen_base.checksum(jnp.asarray(changed)) != base
    assert frozen_base.checksum(jnp.asarray(swapped)) != base
    assert json.loads(json.dumps(base)) == base and len(base) == 16


@pytest.mark.slow  # two processes of 4 devices each: ~1 min here
def test_two_processes_checkpoint_slim_and_record_the_digest_one_device_computes(
    tiny_bert_dir, sst2_slice, tmp_path
):
    """A two-process LoRA job (fsdp over 8 devices) saves and resumes slim checkpoints; the
    checksums its processes computed over their shards give the digest one device gets."""
    run_workers(tmp_path, tiny_bert_dir, sst2_slice, "lora")
    starts = manifest.read_manifest(str(tmp_path))
    config = tiny_config(tiny_bert_dir, sst2_slice)
    config.peft.rank, config.optim.preset = 4, "lora"
    setup = builder.build(config)
    manager = checkpoints.make_manager(str(tmp_path), 2, None, read_only=True)
    state, _ = setup.restore_latest(manager)  # streamed and checked on this one device
    record = checkpoints.frozen_record(manager, 6)
    checkpoints.close(manager)
    assert int(state.step) == 6 and sorted(record["leaves"]) == sorted(setup.frozen_paths)
    assert [s["frozen_base"]["digest"] for s in starts] == [record["digest"]] * 2
    assert setup.frozen_record(state.params)["digest"] == record["digest"]
