"""`python -m finetune_jax.config_keys`: every key of the schema, its value and the help
written beside it in finetune_jax/config.py."""

from __future__ import annotations

import os
import subprocess
import sys

from finetune_jax import config_keys
from finetune_jax.config import base_config
from tests.helpers import REPO


def _keys(node, prefix=""):
    for key in node.keys():
        value = node[key]
        yield from _keys(value, f"{prefix}{key}.") if hasattr(value, "keys") else [prefix + key]


def test_every_key_of_the_schema_has_help():
    helps = config_keys.key_help()
    missing = [
        k for k in _keys(base_config()) if not helps.get(config_keys._known_prefix(k, helps))
    ]
    assert not missing, f"keys with no comment in finetune_jax/config.py: {missing}"
    assert helps["optim"].startswith("AdamW, its schedule")  # a section: its docstring
    assert helps["optim.lr"] == "peak learning rate, reached after warmup"  # the inline comment
    # The comment lines right above a key, "-- group --" rulers left out.
    assert helps["data.task"].startswith("A registered task: a text preset")
    assert helps["data.dir"] == 'local dir with the task\'s files; "" = load from the HF hub'


def test_listing_shows_values_and_keeps_only_keys_with_a_word():
    config = base_config()
    config.optim.lr = 3e-5
    text = config_keys.listing(config, ["optim.lr", "files"])
    lines = text.splitlines()
    assert lines[0] == "data.files.test = ''"
    assert "optim.lr = 3e-05" in lines
    assert sum("Per split, a path or glob" in line for line in lines) == 1  # said once
    assert not any(line.startswith("train.") for line in lines)


def test_cli_lists_an_experiments_values():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "finetune_jax.config_keys",
            "--config=configs/own_data/csv_classifier.py",
            "--config.optim.lr=2e-5",
            "optim.lr",
            "data.text_columns",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines()[:2] == [
        "data.text_columns = ('text',)",
        '    the 1 or 2 text columns; () = the preset\'s ("text")',
    ]
    assert "optim.lr = 2e-05" in result.stdout
