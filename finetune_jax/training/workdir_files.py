"""The files a run writes into its workdir besides checkpoints and metrics: the resolved
config, and a start-up check that the workdir can be written at all."""

from __future__ import annotations

import json
import os

import jax
import ml_collections


def ensure_writable(workdir: str) -> None:
    """Fail at start, not at the first checkpoint, when the workdir cannot be written."""
    # One probe file per process: several processes may share the workdir.
    probe = os.path.join(workdir, f".write-test-{os.uname().nodename}-{os.getpid()}")
    try:
        os.makedirs(workdir, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise PermissionError(
            f"workdir {workdir!r} is not a writable directory ({e.strerror or e}); pass "
            "--workdir=<a directory this user can create and write>"
        ) from None


def write_config(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Write the resolved config as JSON into the workdir (the record of what ran)."""
    if jax.process_index() != 0:
        return os.path.join(workdir, "config.json")
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "config.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(config.to_dict(), f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)
    return path
