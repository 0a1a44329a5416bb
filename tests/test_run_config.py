"""A run's saved config read back, and a given config checked against it."""

from __future__ import annotations

import pytest

from finetune_jax.config import base_config
from finetune_jax.training import run_config, workdir_files


def _saved(tmp_path):
    config = base_config()
    config.data.task = "rte"
    config.data.buckets = (16, 48)
    config.peft.rank = 4
    config.optim.preset = "lora"
    config.optim.rules = ((r".*/kernel", 0.5), (r".*", "frozen"))
    workdir_files.write_config(config, tmp_path)
    return config


def test_saved_config_round_trips_with_tuples_and_lock(tmp_path):
    config = _saved(tmp_path)
    loaded = run_config.saved_config(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert loaded.optim.rules == ((r".*/kernel", 0.5), (r".*", "frozen"))
    assert loaded.sharding.rules[0] == ("batch", ("data", "fsdp"))
    with pytest.raises(AttributeError):
        loaded.data.new_key = 1  # locked like base_config()
    assert run_config.saved_config(tmp_path / "missing") is None


def test_given_config_must_agree_on_meaning_keys(tmp_path):
    _saved(tmp_path)
    given = run_config.saved_config(tmp_path)
    given.data.max_length = 128
    given.peft.rank = 8
    with pytest.raises(run_config.ConfigMismatchError) as error:
        run_config.resolve(tmp_path, given, from_file=True)
    message = str(error.value)
    assert "data.max_length: run has 64, given 128" in message
    assert "peft.rank: run has 4, given 8" in message
    assert "optim" not in message


def test_run_time_keys_may_differ(tmp_path):
    _saved(tmp_path)
    given = run_config.saved_config(tmp_path)
    given.train.batch_size = 7
    given.generate.max_new_tokens = 3
    given.mesh.data = 2
    given.model.dtype = "bfloat16"
    given.data.dir = "/elsewhere"
    assert run_config.resolve(tmp_path, given, from_file=True) is given


def test_overrides_without_a_file_apply_to_the_saved_config(tmp_path):
    _saved(tmp_path)
    parsed = run_config.get_config()  # the --config default: base_config + the overrides
    parsed.train.batch_size = 4
    config = run_config.resolve(
        tmp_path, parsed, from_file=False, override_keys=["train.batch_size"]
    )
    assert config.train.batch_size == 4
    assert config.data.task == "rte" and config.peft.rank == 4  # the rest is the run's
    parsed.data.task = "sst2"
    with pytest.raises(run_config.ConfigMismatchError, match="data.task: run has 'rte'"):
        run_config.resolve(tmp_path, parsed, from_file=False, override_keys=["data.task"])


def test_no_saved_config_needs_a_file(tmp_path):
    (tmp_path / "checkpoints").mkdir()  # a run from before config.json was saved
    with pytest.raises(FileNotFoundError, match="pass --config"):
        run_config.resolve(tmp_path, base_config(), from_file=False)
    given = base_config()
    assert run_config.resolve(tmp_path, given, from_file=True) is given


def test_a_workdir_with_no_run_is_named_instead_of_asking_for_a_config(tmp_path):
    missing = tmp_path / "runs" / "typo"
    with pytest.raises(FileNotFoundError) as error:
        run_config.resolve(missing, base_config(), from_file=False)
    assert (
        str(error.value)
        == f"--workdir={str(missing)!r} does not exist: pass the --workdir of a train run"
    )
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(FileNotFoundError, match=r"holds no run .*it has \['notes.txt'\]"):
        run_config.resolve(tmp_path, base_config(), from_file=False)
    given = base_config()  # eval --checkpoint=pretrained --config=FILE into a new workdir
    assert run_config.resolve(missing, given, from_file=True) is given
