"""Entry-point plumbing: run an absl main and turn user errors into one clear line."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from absl import app, flags, logging

from finetune_jax.cluster import compilation_cache
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
