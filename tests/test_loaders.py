"""A task's loader: the batch spec (what preflight compiles on) is what its batches hold."""

from __future__ import annotations

import numpy as np

from finetune_jax import tasks
from finetune_jax.data import selection, text_sources
from finetune_jax.hf import model_files
from tests.helpers import tiny_config
from tests.test_sft_train import tiny_sft_config


def _assert_batch_fits_spec(batch, spec, exact_shapes):
    assert set(batch) == set(spec)
    for name, (shape, dtype) in spec.items():
        assert batch[name].dtype == dtype, name
        assert batch[name].ndim == len(shape), name
        if exact_shapes:
            assert batch[name].shape == shape, name
        else:  # a bucket up to the longest
            assert all(a <= b for a, b in zip(batch[name].shape, shape)), name


def test_classification_batch_spec_matches_batches(tiny_bert_dir, sst2_slice):
    config = tiny_config(tiny_bert_dir, sst2_slice)
    task = tasks.get_task(config.data.task)
    data = tasks.kind_of(task).loader(
        config, task, model_files.load_tokenizer(str(tiny_bert_dir)), ""
    )
    spec = tasks.kind_of(task).batch_spec(config, task)
    assert spec["input_ids"][0] == (config.train.batch_size, max(config.data.buckets))
    batches = data.train_batches()
    for _ in range(3):
        _assert_batch_fits_spec(next(batches), spec, exact_shapes=False)


def test_chat_batch_spec_matches_batches(tiny_chat_llama_dir):
    config = tiny_sft_config(tiny_chat_llama_dir)
    task = tasks.get_task(config.data.task)
    data = tasks.kind_of(task).loader(
        config, task, model_files.load_tokenizer(str(tiny_chat_llama_dir)), ""
    )
    batch = next(data.train_batches())
    _assert_batch_fits_spec(batch, tasks.kind_of(task).batch_spec(config, task), exact_shapes=True)
    assert np.all(batch["weights"][batch["attention_mask"] == 0] == 0)


def test_text_classification_holdout_stratifies_by_label(tiny_bert_dir, sst2_slice):
    """With data.stratify the loader hands the labels to the one holdout mechanism."""
    config = tiny_config(tiny_bert_dir, sst2_slice)
    config.data.holdout_rows, config.data.stratify = 50, True
    task = tasks.get_task("sst2")
    data = tasks.kind_of(task).loader(
        config, task, model_files.load_tokenizer(str(tiny_bert_dir)), ""
    )
    every = text_sources.load_split(task, str(sst2_slice), "train")
    rows = selection.split_rows(len(every), "holdout", 50, 0, 0, strata=every.labels)
    held = data.examples("holdout")
    assert held.text_a == [every.text_a[i] for i in rows]
    want = np.bincount(every.labels) * 50 / len(every)
    assert np.all(np.abs(np.bincount(held.labels, minlength=len(want)) - want) < 1)
    # The tokenized (cached) split training and eval read holds out the same rows.
    np.testing.assert_array_equal(data.load("holdout").labels, every.labels[rows])
    assert len(data.load("train")) == len(every) - 50
