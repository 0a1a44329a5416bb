"""A run's own resolved config, read back from `<workdir>/config.json` (written by train), so
`eval`, `export`, `predict` and `monitor` need no re-passing of the config file and overrides.

Given a config anyway (`--config` and/or `--config.x=...`), it is compared with the saved one:
keys that change what the trained model or its data *mean* must agree, run-time-only keys may
differ (see `RUN_TIME_KEYS`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from typing import Any

import ml_collections

from finetune_jax.config import apply_overrides, base_config
from finetune_jax.training import workdir_files

# Sections whose keys fix what the checkpoint's params are and what its inputs / outputs mean.
MEANING_SECTIONS = ("model", "data", "peft")
# Keys of those sections that only say how (or where from) a run computes, full-match regexes:
# the compute dtype and recomputation, where the files are, how many eval rows, training-time
# augmentation and subsets, caches. Every other key of MEANING_SECTIONS must agree; keys of
# other sections (generate.*, train.batch_size, mesh.*, optim.*, ...) may always differ.
RUN_TIME_KEYS = (
    r"model\.(dtype|remat|lm_loss_chunk)",
    r"data\.(dir|files|eval_split|max_eval_rows|max_train_rows|cache_dir)",
    r"data\.(augment|augment_scale|augment_flip|packing)",
    # Detection: target padding and how detections are decoded and drawn.
    r"data\.(max_boxes|max_detections|nms_iou|draw_score)",
)


class ConfigMismatchError(ValueError):
    """A given config disagrees with the run's saved one on a key that changes its meaning."""


def _tuples(value: Any) -> Any:
    """JSON lists back to the tuples (and nested tuples) the config holds."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat |= _flat(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def saved_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict | None:
    """The run's resolved config: `base_config()` with the values of `<workdir>/config.json`
    (locked, tuples restored), or None when the workdir has no config.json."""
    path = workdir_files.workdir_path(workdir) / "config.json"
    if not path.exists():
        return None
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); pass --config explicitly") from e
    config = base_config()  # locked: a saved key it does not know is an error, not added
    try:
        apply_overrides(config, _tuples(_flat(values)), str(path))
    except (KeyError, TypeError) as e:
        raise ValueError(
            f"{e.args[0] if e.args else e} (saved by another version of finetune_jax?); "
            "pass --config explicitly"
        ) from None
    return config


def differences(
    saved: ml_collections.ConfigDict, given: ml_collections.ConfigDict
) -> list[tuple[str, Any, Any]]:
    """(key, saved value, given value) for every meaning key (see module docstring) that
    differs between the two configs."""
    old, new = _flat(saved.to_dict()), _flat(given.to_dict())
    diffs = []
    for key in sorted(set(old) | set(new)):
        if key.split(".")[0] not in MEANING_SECTIONS:
            continue
        if any(re.fullmatch(pattern, key) for pattern in RUN_TIME_KEYS):
            continue
        if _tuples(old.get(key)) != _tuples(new.get(key)):
            diffs.append((key, old.get(key), new.get(key)))
    return diffs


def get_config() -> ml_collections.ConfigDict:
    """`base_config()`: the entry points' `--config` default, so that `--config.x=...`
    overrides parse without a config file (`resolve` applies them to the saved config)."""
    return base_config()


def resolve(
    workdir: str | os.PathLike,
    given: ml_collections.ConfigDict,
    from_file: bool,
    override_keys: Sequence[str] = (),
) -> ml_collections.ConfigDict:
    """The config to evaluate / export / predict / monitor `workdir`'s run with.

    `given` is the parsed `--config` flag; `from_file` whether a --config file was passed.
    Without one, the saved config is used, with the `--config.x=...` values (dotted
    `override_keys`, read from `given`) set on it. Either way the result must agree with the
    saved config on every meaning key: model.* (bar dtype / remat), data.* (bar where the
    files are, eval subsets, augmentation), peft.*; run-time keys (generate.*,
    train.batch_size, mesh.*, optim.*, ...) may differ. A workdir without a saved config
    needs a --config file.
    """
    saved = saved_config(workdir)
    root = workdir_files.workdir_path(workdir)
    path = root / "config.json"
    if saved is None:
        if from_file:
            return given
        _check_is_run(workdir)
        raise FileNotFoundError(
            f"{path} does not exist, but the workdir has checkpoints (a run from before "
            "runs saved their config?): pass --config=<the run's config file>"
        )
    if from_file:
        config = given
    else:
        values = {key: _get(given, key) for key in override_keys}
        config = apply_overrides(saved_config(workdir), values, "--config overrides")
    diffs = differences(saved, config)
    if diffs:
        lines = "; ".join(f"{k}: run has {a!r}, given {b!r}" for k, a, b in diffs)
        raise ConfigMismatchError(
            f"the given config differs from the run's saved config ({path}) on keys that "
            f"change what the model or its data mean: {lines}. Drop --config (and such "
            "overrides) to use the saved one, or make these keys agree"
        )
    return config


def _check_is_run(workdir: str | os.PathLike) -> None:
    """Raises unless `workdir` holds a train run's checkpoints: with no run there, no
    --config can help, so the error says what is wrong with the --workdir instead."""
    root = workdir_files.workdir_path(workdir)
    if not root.is_dir():
        raise FileNotFoundError(
            f"--workdir={os.fspath(workdir)!r} does not exist: pass the --workdir of a train run"
        )
    if not (root / "checkpoints").is_dir():
        present = sorted(p.name for p in root.iterdir())
        raise FileNotFoundError(
            f"--workdir={os.fspath(workdir)!r} holds no run (no config.json, no checkpoints; "
            f"it has {present or 'nothing'}): pass the --workdir of a train run"
        )


def _get(config: ml_collections.ConfigDict, key: str) -> Any:
    node = config
    for part in key.split("."):
        node = node[part]
    return node
