"""The entry points' shared plumbing: the one-line `error:` printer, --help, and bad
`--config...` / `--split` / `--workdir` flags named with what to do."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from finetune_jax.cli import _message
from tests.helpers import REPO


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("FINETUNE_JAX_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", f"finetune_jax.{module}", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_os_and_decode_errors_print_their_message_not_their_first_argument():
    assert _message(OSError(30, "Read-only file system", "/ro/out")) == (
        "Read-only file system: '/ro/out'"
    )
    assert _message(PermissionError(13, "Permission denied")) == "Permission denied"
    assert _message(FileNotFoundError("--input='x.csv' does not exist")) == (
        "--input='x.csv' does not exist"
    )
    try:
        b"caf\xe9".decode("utf-8")
    except UnicodeDecodeError as e:
        assert (
            _message(e)
            == "'utf-8' codec can't decode byte 0xe9 in position 3: unexpected end of data"
        )
    assert _message(KeyError("lrr")) == "lrr"  # a KeyError's repr quotes stay unwrapped
    assert _message(ValueError()) == "ValueError"


@pytest.mark.parametrize("module", ["eval", "export", "predict", "monitor"])
def test_help_exits_0_and_shows_config_and_the_override_syntax(module):
    result = _run(module, "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    text = " ".join(result.stdout.split())  # absl wraps help lines
    assert "--config:" in text
    assert "--config.<section>.<key>=<value>" in text
    assert "python -m finetune_jax.config_keys" in text


@pytest.mark.parametrize(
    "module,args,expected",
    [
        (  # parsed while the flag is defined (no --config file): was a traceback
            "eval",
            ["--workdir=runs/x", "--config.optimizer.lr=1e-3"],
            "bad command-line flag --config.optimizer.lr=1e-3: unknown config key "
            "'optimizer.lr': 'optimizer' is not a config section; did you mean 'optim'?",
        ),
        (  # was blamed on --config=<file>, with no suggestion
            "eval",
            [
                "--workdir=runs/x",
                "--config=configs/own_data/csv_classifier.py",
                "--config.optimizer.lr=1e-3",
            ],
            "bad command-line flag --config.optimizer.lr=1e-3: unknown config key",
        ),
        (
            "eval",
            ["--workdir=runs/x", "--split=valdation"],
            "bad command-line flag --split=valdation: unknown split 'valdation'; did you mean "
            "'validation'? (splits: train, validation, test, holdout)",
        ),
        (
            "predict",
            ["--workdir=runs/no_such_run", "--input=x.csv", "--output=y.csv"],
            "--workdir='runs/no_such_run' does not exist: pass the --workdir of a train run",
        ),
    ],
    ids=["section-without-file", "section-with-file", "split", "missing-workdir"],
)
def test_bad_flags_are_one_line_saying_what_to_do(module, args, expected):
    result = _run(module, *args)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and expected in errors[0], result.stderr[-2000:]
    assert "--config=<" not in errors[0]  # no advice to pass a config that cannot help
