"""Entry-point plumbing: run an absl main and turn user errors into one clear line."""

from __future__ import annotations

import ast
import os
import sys
from collections.abc import Callable
from typing import Any

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from finetune_jax.cluster import compilation_cache
from finetune_jax.config import key_problem
from finetune_jax.training import run_config
from finetune_jax.training.checkpoints import CheckpointError
from finetune_jax.training.workdir_lock import WorkdirBusyError

# Errors that describe a bad config, path, data row or weight file: the message says what is
# wrong and what to do, so a traceback would only bury it. FINETUNE_JAX_DEBUG=1 shows it anyway.
USER_ERRORS = (ValueError, KeyError, OSError, CheckpointError, WorkdirBusyError)
# What ml_collections' config flags raise for a bad `--config...` flag, before main runs.
FLAG_ERRORS = (AttributeError, KeyError, TypeError, ValueError, OSError, ImportError)
# absl's help flags print the usage and exit 1; asking for help is no error (exit 0).
HELP_FLAGS = ("--help", "-help", "-?", "--helpshort", "--helpfull", "--helpxml")
# How a `--config` flag reads, in every entry point's --help.
OVERRIDE_HELP = (
    " Override any key with --config.<section>.<key>=<value> (e.g. --config.optim.lr=3e-5); "
    "`python -m finetune_jax.config_keys [--config=FILE]` lists every key, its value and "
    "what it does."
)

# Flags defined here (the run-config flag) belong to the entry point that asks for them, so
# that its --help lists them.
flags.disclaim_key_flags()


def _fail(message: object) -> None:
    print(f"error: {message}\n(set FINETUNE_JAX_DEBUG=1 for the traceback)", file=sys.stderr)
    sys.exit(2)


def _message(e: BaseException) -> str:
    """The error's text on one line. An OSError's first argument is only its errno (`30`)
    and a UnicodeError's only its codec (`utf-8`): those print whole, an OSError as its errno
    text and path(s). config_dict's AttributeError holds the repr of a KeyError's text
    (quotes and escapes included); only such a whole-text repr is unwrapped, so quotes inside
    a message (`'lrr'`) stay."""
    if isinstance(e, OSError) and e.strerror:
        paths = [repr(str(p)) for p in (e.filename, e.filename2) if p is not None]
        text = ": ".join([e.strerror, " -> ".join(paths)] if paths else [e.strerror])
    elif isinstance(e, UnicodeError) or len(e.args) != 1:
        text = str(e) or type(e).__name__
    else:
        text = str(e.args[0]) or type(e).__name__
    if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
        try:
            text = str(ast.literal_eval(text))
        except (ValueError, SyntaxError):
            pass
    return " ".join(text.split())


def _flag_being_parsed(e: BaseException, argv: list[str]) -> tuple[str, str]:
    """(the command-line flag whose parsing raised `e`, as the user wrote it; a message for
    it when `e` is an unknown config key, else ""). absl's `Flag.parse` frame names the flag;
    a config flag's `_parse` frame, the override (`field_path`) it was applying when it
    failed; an unknown section fails earlier, checking the parents of `override`."""
    name = field_path = override = config = None
    tb = e.__traceback__
    while tb is not None:
        local = tb.tb_frame.f_locals
        if isinstance(local.get("self"), flags.Flag):
            name = local["self"].name
            field_path = local["field_path"] if _is_str(local, "field_path") else field_path
            override = local["override"] if _is_str(local, "override") else override
            if isinstance(local.get("config"), ml_collections.ConfigDict):
                config = local["config"]
        tb = tb.tb_next
    if name is None:
        return "(see --help)", ""
    key, problem = field_path, ""
    unknown = field_path or override
    if unknown and config is not None and isinstance(e, (KeyError, AttributeError)):
        problem = key_problem(config, unknown)
        if problem:
            key, problem = unknown, f"unknown config key {unknown!r}{problem}"
    name = f"{name}.{key}" if key is not None else name
    written = [a for a in argv if a.split("=", 1)[0] in (f"--{name}", f"-{name}")]
    return (written[-1] if written else f"--{name}"), problem


def _is_str(local: dict[str, Any], name: str) -> bool:
    return isinstance(local.get(name), str)


def _parse_flags(argv: list[str]) -> Any:
    """absl's flag parsing, with every bad flag (unknown key, wrong type, missing file)
    reported as the one-line `error:` of every other bad input, naming only that flag."""
    argv = [argv[0], *("--help" if a == "-h" else a for a in argv[1:])]
    try:
        return flags.FLAGS(argv)
    except SystemExit as e:  # absl's help flags exit 1 after printing the usage
        if e.code == 1 and any(a.split("=", 1)[0] in HELP_FLAGS for a in argv[1:]):
            sys.exit(0)
        raise
    except flags.Error as e:  # absl's own message names the flag: "flag --x=abc: ..."
        text = _message(e)
        _fail(f"bad command-line {text}" if text.startswith("flag ") else f"bad flag: {text}")
    except FLAG_ERRORS as e:  # raised inside a config flag's parse (ml_collections)
        _fail_flag(e, argv)


def _fail_flag(e: BaseException, argv: list[str]) -> None:
    """A config flag's parse error as one `error:` line naming the flag as written."""
    if os.environ.get("FINETUNE_JAX_DEBUG"):
        raise e
    flag, problem = _flag_being_parsed(e, argv)
    _fail(f"bad command-line flag {flag}: {problem or _message(e)}")


def define_run_config_flag() -> flags.FlagHolder:
    """`--config` for entry points acting on a trained run (eval, export, predict, monitor):
    optional, defaulting to the run's saved config (`training/run_config.py`). A bad
    `--config.x=...` without `--config=FILE` fails here: the default is parsed (overrides
    included) as the flag is defined, before `run_main`."""
    try:
        return config_flags.DEFINE_config_file(
            "config",
            run_config.__file__,  # its get_config() is base_config(): overrides parse without a file
            "Experiment config file; default: the run's own <workdir>/config.json. Given, it must "
            "agree with the saved one on the keys that change what the model means."
            + OVERRIDE_HELP,
        )
    except FLAG_ERRORS as e:
        _fail_flag(e, sys.argv)


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
