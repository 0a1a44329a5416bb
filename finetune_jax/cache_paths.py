"""The project's cache root, shared by converted models, token caches and audio features.

`$FINETUNE_JAX_CACHE`, else `$XDG_CACHE_HOME/finetune_jax`, else `~/.cache/finetune_jax`. A leaf
module (it imports nothing from the package), so data and model-file code can both use it.
"""

from __future__ import annotations

import os
import pathlib

CACHE_ENV = "FINETUNE_JAX_CACHE"


def cache_root() -> pathlib.Path:
    """Where the project keeps what it derives once and reuses (see the module docstring)."""
    if os.environ.get(CACHE_ENV):
        return pathlib.Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "finetune_jax"
