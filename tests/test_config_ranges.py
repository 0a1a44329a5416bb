"""`config_ranges`: every numeric config key has a range, every shipped config lies inside
them, and a value outside one stops `build` (and the train CLI) before anything loads, in one
line naming the key, the value and the range."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys

import pytest

from finetune_jax import config_ranges
from finetune_jax.config import base_config
from finetune_jax.training import builder
from tests.helpers import REPO


def _leaves(config, prefix=""):
    for key, value in config.items():
        if hasattr(value, "items"):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def test_every_numeric_key_of_the_schema_has_a_range_and_every_range_a_key():
    leaves = dict(_leaves(base_config()))
    numeric = {
        key
        for key, value in leaves.items()
        if _is_number(value)
        or (isinstance(value, tuple) and value and all(_is_number(v) for v in value))
    }
    assert numeric - set(config_ranges.RANGES) == set(), "numeric keys without a range"
    assert set(config_ranges.RANGES) - set(leaves) == set(), "ranges of keys that do not exist"


def _shipped_configs():
    for path in sorted((REPO / "configs").glob("*/*.py")):
        spec = importlib.util.spec_from_file_location(f"_config_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield path.relative_to(REPO), module.get_config()


def test_defaults_and_every_shipped_config_lie_inside_the_ranges():
    assert config_ranges.out_of_range(base_config()) == []
    configs = list(_shipped_configs())
    assert len(configs) >= 8
    for path, config in configs:
        assert config_ranges.out_of_range(config) == [], path


@pytest.mark.parametrize(
    "key,value,expected",
    [
        ("optim.lr", -1e-4, "optim.lr=-0.0001 must be >= 0"),
        ("optim.lr", math.inf, "optim.lr=inf must be >= 0"),
        ("optim.eps", math.nan, "optim.eps=nan must be > 0"),
        ("optim.b2", 1.0, "optim.b2=1.0 must be 0 <= x < 1"),
        ("train.batch_size", 0, "train.batch_size=0 must be >= 1"),
        ("train.max_steps", -5, "train.max_steps=-5 must be >= 0"),
        ("peft.dropout", 1.5, "peft.dropout=1.5 must be 0 <= x < 1"),
        ("mesh.data", 0, "mesh.data=0 must be >= 1, or -1"),
        ("data.buckets", (16, 0, -3), "data.buckets=(16, 0, -3): each element must be >= 1, "),
        ("data.augment_scale", (0.0, 1.0), "must be 0 < x <= 1, not 0.0"),
    ],
)
def test_a_value_out_of_range_is_one_error_naming_key_value_and_range(key, value, expected):
    config = base_config()
    section, leaf = key.split(".")
    config[section][leaf] = value
    with pytest.raises(ValueError, match="out of range") as raised:
        config_ranges.check_ranges(config)
    assert expected in str(raised.value)
    assert f"--config.{key}=" in str(raised.value)


def test_sentinels_and_boundaries_that_mean_something_are_accepted():
    config = base_config()
    config.optim.lr = 0.0  # the pretrained model through the train loop
    config.train.max_steps = 0  # evaluate the pretrained model as step 0
    config.mesh.fsdp, config.model.dropout = -1, -1.0  # the rest of the devices; keep dropout
    config.optim.clip_norm = -1.0  # <= 0 disables clipping
    assert config_ranges.out_of_range(config) == []


def test_every_bad_key_is_named_at_once():
    config = base_config()
    config.optim.lr, config.train.batch_size = -1e-4, 0
    with pytest.raises(ValueError, match="config values out of range") as raised:
        config_ranges.check_ranges(config)
    assert "optim.lr=-0.0001" in str(raised.value) and "train.batch_size=0" in str(raised.value)


def test_build_refuses_before_anything_loads(tmp_path):
    config = base_config()
    config.model.name = str(tmp_path / "no-such-model")  # loading it would fail differently
    config.data.dir = str(tmp_path / "no-such-data")
    config.train.batch_size = 0
    with pytest.raises(ValueError, match=r"train.batch_size=0 must be >= 1"):
        builder.build(config)


def test_train_cli_with_a_negative_lr_exits_2_with_one_line(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("FINETUNE_JAX_DEBUG", None)
    result = subprocess.run(
        [sys.executable, "-m", "finetune_jax.train", "--config=configs/glue/sst2_minilm.py"]
        + [f"--workdir={tmp_path / 'run'}", "--config.optim.lr=-1e-4"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        "error: config value out of range: optim.lr=-0.0001 must be >= 0. Fix it in the "
        "config file or on the command line (--config.optim.lr=...)"
    ], result.stderr[-2000:]
