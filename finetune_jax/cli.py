"""Entry-point plumbing: run an absl main and turn user errors into one clear line."""

from __future__ import annotations

import ast
import os
import sys
from collections.abc import Callable
from typing import Any

from absl import app, flags, logging
from ml_collections import config_flags

from finetune_jax.cluster import compilation_cache
from finetune_jax.training import run_config
from finetune_jax.training.checkpoints import CheckpointError

# Errors that describe a bad config, path, data row or weight file: the message says what is
# wrong and what to do, so a traceback would only bury it. FINETUNE_JAX_DEBUG=1 shows it anyway.
USER_ERRORS = (ValueError, KeyError, OSError, CheckpointError)
# What ml_collections' config flags raise for a bad `--config...` flag, before main runs.
FLAG_ERRORS = (AttributeError, KeyError, TypeError, ValueError, OSError, ImportError)


def _fail(message: object) -> None:
    print(f"error: {message}\n(set FINETUNE_JAX_DEBUG=1 for the traceback)", file=sys.stderr)
    sys.exit(2)


def _message(e: BaseException) -> str:
    """The error's text on one line. config_dict's AttributeError holds the repr of a
    KeyError's text (quotes and escapes included); only such a whole-text repr is unwrapped,
    so quotes inside a message (`'lrr'`) stay."""
    text = str(e.args[0]) if e.args else str(e)
    if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
        try:
            text = str(ast.literal_eval(text))
        except (ValueError, SyntaxError):
            pass
    return " ".join(text.split())


def _flag_being_parsed(e: BaseException, argv: list[str]) -> str:
    """The command-line flag whose parsing raised `e`, as the user wrote it: absl's
    `Flag.parse` frame names the flag; a config flag's `_parse` frame, the override
    (`field_path`) it was applying when it failed."""
    name, tb = None, e.__traceback__
    while tb is not None:
        local = tb.tb_frame.f_locals
        if isinstance(local.get("self"), flags.Flag):
            name = local["self"].name
            if isinstance(local.get("field_path"), str):
                name += "." + local["field_path"]
        tb = tb.tb_next
    if name is None:
        return "(see --help)"
    written = [a for a in argv if a.split("=", 1)[0] in (f"--{name}", f"-{name}")]
    return written[-1] if written else f"--{name}"


def _parse_flags(argv: list[str]) -> Any:
    """absl's flag parsing, with every bad flag (unknown key, wrong type, missing file)
    reported as the one-line `error:` of every other bad input, naming only that flag."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:  # absl's own message names the flag: "flag --x=abc: ..."
        text = _message(e)
        _fail(f"bad command-line {text}" if text.startswith("flag ") else f"bad flag: {text}")
    except FLAG_ERRORS as e:  # raised inside a config flag's parse (ml_collections)
        if os.environ.get("FINETUNE_JAX_DEBUG"):
            raise
        _fail(f"bad command-line flag {_flag_being_parsed(e, argv)}: {_message(e)}")


def define_run_config_flag() -> flags.FlagHolder:
    """`--config` for entry points acting on a trained run (eval, export, predict, monitor):
    optional, defaulting to the run's saved config (`training/run_config.py`)."""
    return config_flags.DEFINE_config_file(
        "config",
        run_config.__file__,  # its get_config() is base_config(): overrides parse without a file
        "Experiment config file; default: the run's own <workdir>/config.json. Given, it must "
        "agree with the saved one on the keys that change what the model means.",
    )


def resolve_run_config(config: flags.FlagHolder, workdir: str):
    """The run's config: its saved one with the `--config.x=...` overrides of the command
    line, or the `--config` file's, checked against the saved one (`run_config.resolve`)."""
    keys = [a[9:].split("=", 1)[0] for a in sys.argv[1:] if a.startswith("--config.")]
    return run_config.resolve(workdir, config.value, flags.FLAGS["config"].present, keys)


def quiet_libraries() -> None:
    """Warnings only from absl-logging libraries (Orbax logs every save step at INFO),
    unless the user asked for a level with --verbosity."""
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
        # Orbax warns on every read-only checkpoint manager (eval, export, predict restore).
        logging.get_absl_handler().addFilter(
            lambda record: not record.getMessage().startswith("Given directory is read only")
        )
    import datasets  # noqa: PLC0415

    datasets.disable_progress_bars()


def run_main(main: Callable[[list[str]], None]) -> None:
    """`absl.app.run(main)`, printing user errors as `error: ...` with exit status 2.

    Every entry point runs with JAX's persistent compilation cache (`cluster/
    compilation_cache.py`), so a second run of a config starts without recompiling.
    """
    debug = bool(os.environ.get("FINETUNE_JAX_DEBUG"))

    def guarded(argv: list[str]) -> None:
        compilation_cache.enable()
        try:
            main(argv)
        except USER_ERRORS as e:
            if debug:
                raise
            _fail(_message(e))

    app.run(guarded, flags_parser=_parse_flags)
