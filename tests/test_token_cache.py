"""The on-disk token cache: same tokens as in-memory tokenization, keyed by everything the
tokens depend on, built once even when processes race; streamed split chunks."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
import transformers

from finetune_jax.data import text_batches, text_sources, token_cache
from finetune_jax.data.text_tasks import TASKS

SST2 = TASKS["sst2"]


@pytest.fixture
def tokenizer(minilm_dir):
    return transformers.AutoTokenizer.from_pretrained(minilm_dir)


@pytest.fixture
def data_dir(sst2_slice, tmp_path):
    """A private copy of the SST-2 slice that a test may edit."""
    out = tmp_path / "sst2"
    out.mkdir()
    for name in ("train.tsv", "dev.tsv"):
        (out / name).write_bytes((sst2_slice / name).read_bytes())
    return out


def count_builds(monkeypatch) -> list[str]:
    """Records the target directory of every cache build."""
    builds, build = [], token_cache._build

    def recording(chunks, tokenizer, max_length, target, meta):
        builds.append(target.name)
        build(chunks, tokenizer, max_length, target, meta)

    monkeypatch.setattr(token_cache, "_build", recording)
    return builds


def test_cached_split_equals_in_memory_tokenization(tokenizer, data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(token_cache, "CHUNK_ROWS", 64)  # several chunks for 200 rows
    cached = token_cache.open_split(SST2, data_dir, "train", tokenizer, 32, str(tmp_path / "c"))
    encoded = text_batches.tokenize(text_sources.load_split(SST2, data_dir, "train"), tokenizer, 32)
    assert len(cached) == len(encoded) == 200
    for i in range(len(encoded)):
        assert np.array_equal(cached.input_ids[i], encoded.input_ids[i])
        assert np.array_equal(cached.token_type_ids[i], encoded.token_type_ids[i])
    assert np.array_equal(cached.lengths, encoded.lengths)
    assert cached.labels.dtype == encoded.labels.dtype
    assert np.array_equal(cached.labels, encoded.labels)
    rows = np.array([5, 0, 199])
    view = cached.take(rows).take(np.array([2, 0]))  # a view of a view
    assert np.array_equal(view.input_ids[0], encoded.input_ids[199])
    assert np.array_equal(view.labels, encoded.labels[[199, 5]])
    assert np.array_equal(view.lengths, encoded.lengths[[199, 5]])


def test_cache_is_reused_and_rebuilt_when_its_inputs_change(
    tokenizer, minilm_dir, data_dir, tmp_path, monkeypatch
):
    builds = count_builds(monkeypatch)
    cache = str(tmp_path / "cache")

    def open_train(tok=tokenizer, max_length=32, task=SST2):
        return token_cache.open_split(task, data_dir, "train", tok, max_length, cache).directory

    first = open_train()
    assert open_train() == first and len(builds) == 1  # a hit: nothing tokenized again
    train_file = data_dir / "train.tsv"
    os.utime(train_file, ns=(1, 1))  # touched, same content: still a hit
    assert open_train() == first and len(builds) == 1

    changed = {open_train(max_length=24)}
    other_tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    other_tokenizer.add_tokens(["zzzunseenword"])
    changed.add(open_train(tok=other_tokenizer))
    lines = train_file.read_text().splitlines(keepends=True)
    train_file.write_text("".join(lines[:-1]))  # one row fewer
    changed.add(open_train())
    assert first not in changed and len(changed) == 3 and len(builds) == 4


def test_concurrent_opens_build_once(tokenizer, data_dir, tmp_path, monkeypatch):
    builds = count_builds(monkeypatch)
    cache = str(tmp_path / "cache")
    found, errors = [], []

    def open_dev():
        try:
            found.append(token_cache.open_split(SST2, data_dir, "validation", tokenizer, 32, cache))
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=open_dev) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(builds) == 1
    assert len({split.directory for split in found}) == 1
    leftovers = [p.name for p in (tmp_path / "cache" / "text_tokens").iterdir() if p.name[0] == "."]
    assert leftovers == []  # no temporary directory left behind


def test_chunks_equal_the_whole_split_and_errors_name_the_line(data_dir):
    whole = text_sources.load_split(SST2, data_dir, "train")
    chunks = list(text_sources.iter_split_chunks(SST2, data_dir, "train", 64))
    assert [len(c) for c in chunks] == [64, 64, 64, 8]
    assert [t for c in chunks for t in c.text_a] == whole.text_a
    assert np.array_equal(np.concatenate([c.labels for c in chunks]), whole.labels)

    train_file = data_dir / "train.tsv"
    lines = train_file.read_text().splitlines(keepends=True)
    lines[150] = "a sentence\tmaybe\n"  # line 151 of the file, in the third chunk
    train_file.write_text("".join(lines))
    with pytest.raises(text_sources.DataError, match=r"train.tsv' line 151: label 'maybe'"):
        list(text_sources.iter_split_chunks(SST2, data_dir, "train", 64))


def test_slow_tokenizer_identity_is_its_vocab_and_settings(minilm_dir):
    slow = transformers.BertTokenizer.from_pretrained(minilm_dir)
    same = transformers.BertTokenizer.from_pretrained(minilm_dir)
    assert token_cache.tokenizer_identity(slow) == token_cache.tokenizer_identity(same)
    same.add_tokens(["zzzunseenword"])
    assert token_cache.tokenizer_identity(slow) != token_cache.tokenizer_identity(same)
