"""Write an HF model directory (config.json, model.safetensors, tokenizer or image processor,
generation config)
that transformers loads, through a temporary sibling renamed into place: an export never
leaves a half-written directory, and never replaces an existing one unless asked."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np

from finetune_jax.hf import model_files
from finetune_jax.models.family import ModelFamily


def exported_config(
    hf_config: dict[str, Any], family: ModelFamily, head_keys: dict[str, Any]
) -> dict[str, Any]:
    """The exported config.json: the pretrained one, naming the class of the family's bound
    head, with the task's `head_keys` (labels) on top."""
    config = {k: v for k, v in hf_config.items() if k not in ("_name_or_path", "dtype")}
    config["torch_dtype"] = "float32"
    model_type = config.get("model_type", family.model_types[0])
    config["architectures"] = [family.class_name(model_type)]
    return config | head_keys


def generation_config(tokenizer: Any, hf_config: dict[str, Any]) -> dict[str, Any]:
    """Token ids transformers' `generate` needs (a GGUF-derived config may lack them)."""

    def pick(key: str) -> Any:  # absent or null in the model config: the tokenizer's
        value = hf_config.get(key)
        return getattr(tokenizer, key) if value is None else value

    config = {key: pick(key) for key in ("bos_token_id", "eos_token_id")}
    config["pad_token_id"] = tokenizer.pad_token_id
    return {k: v for k, v in config.items() if v is not None}


def write_model_dir(
    out_dir: str,
    tensors: dict[str, np.ndarray],
    config: dict[str, Any],
    tokenizer: Any,
    generation: dict[str, Any] | None = None,
    write_extra: Callable[[str], None] | None = None,
    overwrite: bool = False,
) -> str:
    """Writes an HF model directory; `tokenizer` is a tokenizer or an image processor (both
    `save_pretrained` their files); `write_extra(tmp_dir)` adds more files (an adapter)."""

    def fill(tmp: str) -> None:
        model_files.write_safetensors(tensors, tmp, config)
        tokenizer.save_pretrained(tmp)
        if generation is not None:
            with open(os.path.join(tmp, "generation_config.json"), "w") as f:
                json.dump(generation, f, indent=2)
        if write_extra is not None:
            write_extra(tmp)

    return write_dir(out_dir, fill, overwrite)


def write_dir(out_dir: str, fill: Callable[[str], None], overwrite: bool = False) -> str:
    """`fill(tmp_dir)` writes a directory's files into a temporary sibling of `out_dir`,
    which is then renamed into place; an existing non-empty `out_dir` is an error unless
    `overwrite`. Returns the absolute `out_dir`."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite:
        raise FileExistsError(
            f"export directory {out_dir} exists and is not empty; choose another --out or "
            "pass --overwrite"
        )
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)
    try:
        fill(tmp)
        _readable(tmp)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _readable(tree: str) -> None:
    """Give `tree` the modes plain `mkdir` / `open` would (0755 / 0644 under umask 022):
    mkdtemp makes the directory owner-only (0700) and safetensors writes its files 0600, so
    serving accounts and colleagues could not read the export."""
    umask = os.umask(0)
    os.umask(umask)
    for root, dirs, files in os.walk(tree):
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~umask)
    os.chmod(tree, 0o777 & ~umask)
