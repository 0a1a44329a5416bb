"""JAX's persistent compilation cache, on by default for every entry point.

A second run of the same config (a resume, an eval, a sweep's next seed, a restarted job)
loads its compiled steps from disk instead of compiling them again. The location is
`$FINETUNE_JAX_COMPILATION_CACHE`, else JAX's own `JAX_COMPILATION_CACHE_DIR`, else
`~/.cache/finetune_jax/jax_compilation_cache`; `FINETUNE_JAX_COMPILATION_CACHE=off` turns it
off. JAX writes each entry to a temporary file and renames it, so processes that share the
directory (hosts of one job, parallel sweeps) never read a half-written entry; an entry is
keyed by the program, the compile options, the backend and the jax/jaxlib versions, so a
stale one is never used.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

ENV = "FINETUNE_JAX_COMPILATION_CACHE"
DEFAULT_DIR = Path("~/.cache/finetune_jax/jax_compilation_cache")
# Programs that compile faster than this are not worth a disk entry (and a read per start).
MIN_COMPILE_SECONDS = 0.5


def cache_dir() -> str | None:
    """The cache directory in effect for this process's environment, or None when off."""
    chosen = os.environ.get(ENV) or os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if chosen and chosen.lower() in ("off", "0", "none", "false"):
        return None
    return str(Path(chosen or DEFAULT_DIR).expanduser())


def enable(
    directory: str | None = None, min_compile_seconds: float = MIN_COMPILE_SECONDS
) -> str | None:
    """Point JAX's persistent compilation cache at `directory` (default: `cache_dir()`).

    Call before the first compile. Returns the directory used, or None when disabled.
    """
    directory = directory or cache_dir()
    if directory is None:
        return None
    if "://" not in directory:  # a gs:// cache is JAX's to create
        Path(directory).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_seconds)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory
