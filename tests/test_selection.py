"""Stratified holdout and caps in `data/selection.py` (the plain draw: test_sft_train.py)."""

from __future__ import annotations

import numpy as np
import pytest

from finetune_jax.config import base_config
from finetune_jax.data import selection

# Three classes of 70, 20 and 10 rows, interleaved as a file would hold them.
STRATA = np.random.default_rng(0).permutation(np.repeat([0, 1, 2], [70, 20, 10]))


def test_stratified_holdout_keeps_every_class_share_and_is_fixed_by_split_seed():
    held = selection.split_rows(100, "holdout", 20, 0, split_seed=5, strata=STRATA)
    train = selection.split_rows(100, "train", 20, 0, split_seed=5, strata=STRATA)
    np.testing.assert_array_equal(np.bincount(STRATA[held]), [14, 4, 2])
    assert set(held).isdisjoint(train) and set(held) | set(train) == set(range(100))
    again = selection.split_rows(100, "holdout", 20, 0, split_seed=5, strata=STRATA)
    np.testing.assert_array_equal(held, again)
    other = selection.split_rows(100, "holdout", 20, 0, split_seed=6, strata=STRATA)
    assert not np.array_equal(held, other)
    np.testing.assert_array_equal(np.bincount(STRATA[other]), [14, 4, 2])


def test_stratified_quotas_round_to_the_requested_count():
    # 25% of 70 / 20 / 10 is 17.5 / 5 / 2.5: the remainders decide who gets the last row.
    held = selection.split_rows(100, "holdout", 25, 0, split_seed=0, strata=STRATA)
    assert len(held) == 25
    counts = np.bincount(STRATA[held])
    assert counts[1] == 5 and sorted(counts[[0, 2]].tolist()) in ([2, 18], [3, 17])


def test_stratified_cap_draws_from_train_only_in_proportion():
    held = selection.split_rows(100, "holdout", 20, 0, split_seed=1, strata=STRATA)
    capped = selection.split_rows(100, "train", 20, 40, split_seed=1, strata=STRATA)
    assert len(capped) == 40 and set(capped).isdisjoint(held)
    np.testing.assert_array_equal(np.bincount(STRATA[capped]), [28, 8, 4])
    evaluated = selection.split_rows(100, "validation", 0, 10, split_seed=1, strata=STRATA)
    np.testing.assert_array_equal(np.bincount(STRATA[evaluated]), [7, 2, 1])


def test_config_rows_stratifies_only_when_asked_and_names_the_key_without_labels():
    config = base_config()
    config.data.holdout_rows, config.data.split_seed = 20, 2
    plain = selection.config_rows(config, "holdout", 100, STRATA)
    np.testing.assert_array_equal(plain, selection.split_rows(100, "holdout", 20, 0, 2))
    config.data.stratify = True
    stratified = selection.config_rows(config, "holdout", 100, STRATA)
    np.testing.assert_array_equal(np.bincount(STRATA[stratified]), [14, 4, 2])
    with pytest.raises(ValueError, match="data.stratify=True.*'sst2'.*stratify=False"):
        selection.config_rows(config, "holdout", 100)
    multi_hot = np.zeros((100, 3))
    with pytest.raises(ValueError, match=r"one class per row.*\(100, 3\).*stratify=False"):
        selection.config_rows(config, "holdout", 100, multi_hot)


def test_max_eval_rows_caps_the_holdout_without_moving_train_rows():
    config = base_config()
    config.data.holdout_rows, config.data.max_eval_rows = 40, 10
    held = selection.split_rows(100, "holdout", 40, 0, split_seed=0)
    capped = selection.config_rows(config, "holdout", 100)
    assert len(capped) == 10 and set(capped) <= set(held)
    np.testing.assert_array_equal(capped, selection.config_rows(config, "holdout", 100))
    train = selection.config_rows(config, "train", 100)
    np.testing.assert_array_equal(train, selection.split_rows(100, "train", 40, 0, split_seed=0))
    config.data.stratify = True  # the stratified holdout's cap keeps each class's share
    stratified = selection.config_rows(config, "holdout", 100, STRATA)
    assert len(stratified) == 10 and set(stratified) <= set(
        selection.split_rows(100, "holdout", 40, 0, split_seed=0, strata=STRATA)
    )
    np.testing.assert_array_equal(np.bincount(STRATA[stratified], minlength=3), [7, 2, 1])
