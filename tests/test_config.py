"""The config schema's own checks: unknown keys and sections named with the closest ones."""

from __future__ import annotations

import pytest

from finetune_jax.config import apply_overrides, base_config, did_you_mean, key_problem


def test_did_you_mean_finds_a_section_a_prefix_of_the_typo():
    sections = ["data", "generate", "mesh", "model", "optim", "peft", "train"]
    assert did_you_mean("optimizer", sections) == "did you mean 'optim'?"
    assert did_you_mean("valdation", ["train", "validation", "test"]) == (
        "did you mean 'validation'?"
    )
    assert did_you_mean("zzz", sections) == ""


def test_key_problem_names_the_part_that_is_wrong():
    config = base_config()
    assert key_problem(config, "optim.lr") == ""
    assert key_problem(config, "optimizer.lr").startswith(
        ": 'optimizer' is not a config section; did you mean 'optim'? (sections there: data,"
    )
    assert key_problem(config, "optim.lrr").endswith("weight_decay; did you mean 'lr'?")
    assert key_problem(config, "optim.lr.x") == ": 'optim.lr' is a value, not a config section"


def test_apply_overrides_says_where_and_suggests():
    with pytest.raises(
        KeyError, match=r"'train\.batchsize' in sweep x;.*did you mean 'batch_size'"
    ):
        apply_overrides(base_config(), {"train.batchsize": 8}, "sweep x")
