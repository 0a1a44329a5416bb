"""Entry-point plumbing: run an absl main and turn user errors into one clear line."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from absl import app, flags, logging
from ml_collections import config_flags

from finetune_jax.cluster import compilation_cache
from finetune_jax.training import run_config
from finetune_jax.training.checkpoints import CheckpointError

# Errors that describe a bad config, path, data row or weight file: the message says what is
# wrong and what to do, so a traceback would only bury it. FINETUNE_JAX_DEBUG=1 shows it anyway.
USER_ERRORS = (ValueError, KeyError, OSError, CheckpointError)
# What ml_collections' config flags raise for a bad `--config...` flag, before main runs.
FLAG_ERRORS = (AttributeError, KeyError, TypeError, ValueError, FileNotFoundError, ImportError)


def _fail(message: object) -> None:
    print(f"error: {message}\n(set FINETUNE_JAX_DEBUG=1 for the traceback)", file=sys.stderr)
    sys.exit(2)


def _message(e: BaseException) -> str:
    # KeyError and config_dict's AttributeError wrap their text in quotes; unwrap it.
    text = str(e.args[0]) if e.args else str(e)
    return text.strip("'\"").replace("\\n", " ").replace("\\'", "'")


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
    import datasets  # noqa: PLC0415

    datasets.disable_progress_bars()


def run_main(main: Callable[[list[str]], None]) -> None:
    """`absl.app.run(main)`, printing user errors as `error: ...` with exit status 2.

    Every entry point runs with JAX's persistent compilation cache (`cluster/
    compilation_cache.py`), so a second run of a config starts without recompiling.
    """
    started = False
    debug = bool(os.environ.get("FINETUNE_JAX_DEBUG"))

    def guarded(argv: list[str]) -> None:
        nonlocal started
        started = True
        compilation_cache.enable()
        try:
            main(argv)
        except USER_ERRORS as e:
            if debug:
                raise
            _fail(_message(e))

    try:
        app.run(guarded)
    except FLAG_ERRORS as e:
        if started or debug:
            raise
        overrides = [a.split("=", 1)[0] for a in sys.argv[1:] if a.startswith("--config.")]
        _fail(f"bad command-line flag ({' '.join(overrides) or 'see --help'}): {_message(e)}")
