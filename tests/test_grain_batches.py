"""Per-host Grain training batches: the global order of `TrainBatches`, each process reading
only its rows, exact resume, prefetch equal to synchronous, changed data refused."""

from __future__ import annotations

import grain
import numpy as np
import pytest
import transformers

from finetune_jax.data import grain_batches, text_batches, token_cache
from finetune_jax.data.text_tasks import TASKS
from finetune_jax.train import train
from tests.helpers import tiny_config

BUCKETS = (16, 32)


@pytest.fixture(scope="module")
def split(minilm_dir, sst2_slice, tmp_path_factory):
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    cache = str(tmp_path_factory.mktemp("cache"))
    return token_cache.open_split(TASKS["sst2"], sst2_slice, "train", tokenizer, 32, cache)


def batches(split, process=(0, 1), prefetch=0, seed=0, batch_size=32):
    shard = grain.sharding.ShardOptions(shard_index=process[0], shard_count=process[1])
    return grain_batches.GrainTrainBatches(
        split, batch_size, seed, BUCKETS, pad_id=0, prefetch=prefetch, shard=shard
    )


def take(iterator, count):
    return [next(iterator) for _ in range(count)]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert x[key].dtype == y[key].dtype and np.array_equal(x[key], y[key]), key


def test_global_batches_are_those_of_train_batches(split):
    # 200 rows / 32 = 6 batches per epoch: 14 batches cross two epoch boundaries.
    expected = text_batches.TrainBatches(split, 32, 0, BUCKETS, pad_id=0)
    assert_same(take(batches(split), 14), take(expected, 14))


def test_process_slices_concatenate_to_the_global_batch(split):
    whole = take(batches(split), 8)
    halves = [take(batches(split, (p, 2)), 8) for p in range(2)]
    for step, batch in enumerate(whole):
        for key, value in batch.items():
            joined = np.concatenate([halves[0][step][key], halves[1][step][key]])
            assert np.array_equal(joined, value), (step, key)


def test_each_process_reads_only_its_rows(split, monkeypatch):
    read = []

    class Recording:
        def __init__(self, ragged):
            self.ragged = ragged

        def __getitem__(self, row):
            read.append(int(row))
            return self.ragged[row]

    view = split.take(np.arange(len(split)))
    monkeypatch.setattr(view, "input_ids", Recording(view.input_ids))
    take(batches(view, (1, 2)), 6)  # one epoch
    order = text_batches.epoch_permutation(len(split), 0, 0)[: 6 * 32].reshape(6, 32)
    assert read == order[:, 16:].ravel().tolist()  # the second half of every global batch


def test_prefetch_yields_the_synchronous_batches(split):
    assert_same(take(batches(split, prefetch=3), 10), take(batches(split), 10))


@pytest.mark.parametrize("skip", [0, 5, 6, 9])
def test_restore_continues_exactly_with_prefetch(split, skip):
    straight = batches(split, prefetch=2)
    expected = take(straight, skip + 5)[skip:]
    first = batches(split, prefetch=2)
    take(first, skip)
    state = first.state()
    assert state["grain"] == {"next_index": skip}
    assert (state["epoch"], state["batch_in_epoch"]) == divmod(skip, 6)
    resumed = batches(split, prefetch=2)
    take(resumed, 3)  # somewhere else, with batches already prefetched
    resumed.restore(state)
    assert_same(take(resumed, 5), expected)


def test_state_of_train_batches_resumes(split):
    """A checkpoint written before Grain (epoch and batch only) resumes at its position."""
    expected = take(batches(split), 12)[7:]
    resumed = batches(split)
    resumed.restore({"epoch": 1, "batch_in_epoch": 1})
    assert_same(take(resumed, 5), expected)


def test_restore_on_changed_data_names_the_file(split):
    iterator = batches(split)
    state = iterator.state()
    (path,) = state["files"]
    state["files"] = {path: "0" * 40}
    with pytest.raises(grain_batches.DataChangedError, match=f"{path}.*fresh workdir"):
        batches(split).restore(state)
    moved = {"/elsewhere/train.tsv": split.fingerprint[path]}  # same content, moved: fine
    batches(split).restore({**iterator.state(), "files": moved})


def test_resuming_a_run_on_changed_data_is_an_error(tiny_bert_dir, sst2_slice, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("train.tsv", "dev.tsv"):
        (data / name).write_bytes((sst2_slice / name).read_bytes())
    config = tiny_config(tiny_bert_dir, data, max_steps=1, eval_every=1)
    config.data.cache_dir = str(tmp_path / "cache")
    train(config, str(tmp_path / "run"))
    lines = (data / "train.tsv").read_text().splitlines(keepends=True)
    (data / "train.tsv").write_text("".join(lines[:-1]))
    config.train.max_steps = 2
    with pytest.raises(grain_batches.DataChangedError, match="train.tsv' changed"):
        train(config, str(tmp_path / "run"))


def test_restore_with_other_batches_per_epoch_is_refused(split):
    """Fewer training rows (max_train_rows, holdout_rows) move every batch number."""
    state = batches(split).state()
    state["grain"] = {"next_index": 7}  # epoch 1, batch 1 at 6 batches per epoch...
    state["epoch"], state["batch_in_epoch"] = 2, 1  # ...but saved at 3 per epoch
    with pytest.raises(grain_batches.DataChangedError, match="data.max_train_rows"):
        batches(split).restore(state)
