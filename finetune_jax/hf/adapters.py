"""Adapter files of every PEFT method: the adapter leaves alone as safetensors keyed by param
path, and the HF PEFT format (`adapter_config.json` + `adapter_model.safetensors`) that
`peft.PeftModel.from_pretrained` loads onto the transformers model: LoRA and DoRA
(`LoraConfig`, `use_dora`), IA3 (`IA3Config`) and prompt tuning (`PromptTuningConfig`)."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import safetensors.numpy

from finetune_jax.hf import model_files
from finetune_jax.models import ia3
from finetune_jax.models.family import ModelFamily
from finetune_jax.models.hf_mapping import HFMapping, param_to_hf, row_value
from finetune_jax.models.lora import (
    LORA_A,
    LORA_B,
    LORA_MAGNITUDE,
    LoraConfig,
    adapter_params,
    flat_paths,
    is_adapter_path,
    nested,
)
from finetune_jax.models.prompt_tuning import PROMPT_EMBEDDINGS

HF_PREFIX = "base_model.model."  # PEFT's key prefix for the wrapped model's modules
# Prompt learning wraps no tuner around the model: its modules sit one level up.
PROMPT_PREFIX = "base_model."
# Our adapter leaf next to a kernel -> (PEFT's tensor suffix, its [out, in]-side layout).
_HF_LEAVES = {
    LORA_A: ".lora_A.weight",
    LORA_B: ".lora_B.weight",
    LORA_MAGNITUDE: ".lora_magnitude_vector",
    ia3.SCALE: ".ia3_l",
    ia3.INPUT_SCALE: ".ia3_l",
}


def save_adapter(params: Mapping[str, Any], path: str, lora: LoraConfig | None = None) -> None:
    """Writes the adapter leaves as safetensors keyed by '/'-joined path (+ the config, if
    given)."""
    tensors = {p: np.ascontiguousarray(v) for p, v in flat_paths(adapter_params(params)).items()}
    metadata = {"lora": json.dumps(dataclasses.asdict(lora))} if lora is not None else None
    safetensors.numpy.save_file(tensors, path, metadata=metadata)


def load_adapter(params: Mapping[str, Any], path: str) -> dict[str, Any]:
    """`params` with its adapter leaves replaced by those saved at `path`.

    The file must hold exactly the model's adapter leaves at their shapes; anything else is a
    ValueError naming the paths, so an adapter never half-loads into another model.
    """
    loaded = safetensors.numpy.load_file(path)
    flat = flat_paths(params)
    ours = {p for p in flat if is_adapter_path(p)}
    if set(loaded) != ours:
        raise ValueError(
            f"adapter {path} does not fit this model: missing {sorted(ours - set(loaded))[:4]}, "
            f"unexpected {sorted(set(loaded) - ours)[:4]}"
        )
    for p, value in loaded.items():
        if tuple(value.shape) != tuple(np.shape(flat[p])):
            raise ValueError(
                f"adapter {path}: {p} has shape {value.shape}, model needs {np.shape(flat[p])}"
            )
        flat[p] = value
    return nested(flat)


def _hf_layout(leaf: str, value: np.ndarray, out_features: int, in_features: int) -> np.ndarray:
    """One of our adapter leaves (one layer) in PEFT's layout, against the torch Linear
    weight [out, in] that our kernel [*in, *out] is the transpose of."""
    if leaf == LORA_A:  # [*in, r] -> [r, in]
        return value.reshape(in_features, -1).T
    if leaf == LORA_B:  # [r, *out] -> [out, r]
        return value.reshape(-1, out_features).T
    if leaf == LORA_MAGNITUDE:  # [*out] -> [out]
        return value.reshape(out_features)
    if leaf == ia3.INPUT_SCALE:  # [*in, 1..] -> [1, in]
        return value.reshape(1, in_features)
    return value.reshape(out_features, 1)  # ia3.SCALE: [1.., *out] -> [out, 1]


def hf_adapter_tensors(
    params: Mapping[str, Any], mappings: Sequence[HFMapping]
) -> dict[str, np.ndarray]:
    """Adapter leaves next to kernels -> HF PEFT tensors: LoRA's `<module>.lora_A.weight`
    [r, in] and `lora_B.weight` [out, r], DoRA's `lora_magnitude_vector` [out], IA3's
    `ia3_l` ([out, 1] on the output, [1, in] on the input).

    `mappings` are `HFMapping` rows with full paths and keys. Our kernel flattened to
    [in, out] is the HF Linear weight transposed; split-head kernels flatten in HF's
    row-major order. Stacked leaves (scanned layers) give one HF module's tensors per layer.
    """
    flat = flat_paths(params)
    tensors, mapped = {}, set()
    for m in mappings:
        layer = m.path.removesuffix("kernel")
        leaves = [leaf for leaf in _HF_LEAVES if layer + leaf in flat]
        if not m.path.endswith("/kernel") or not leaves:
            continue
        if not m.transpose or len(m.hf_shape) != 2:
            raise ValueError(f"{m.path} is not a torch Linear weight; HF PEFT cannot adapt it")
        module = HF_PREFIX + m.hf_key.removesuffix(".weight")
        for leaf in leaves:
            value = np.asarray(row_value(m, flat[layer + leaf]), np.float32)
            hf = _hf_layout(leaf, value, *m.hf_shape)
            tensors[module + _HF_LEAVES[leaf]] = np.ascontiguousarray(hf)
            mapped.add(layer + leaf)
    unmapped = sorted(p for p in flat if p.rsplit("/", 1)[-1] in _HF_LEAVES and p not in mapped)
    if unmapped:
        raise ValueError(f"no HF weight for the kernels of these adapter params: {unmapped[:4]}")
    return tensors


def _modules(tensors: Mapping[str, Any]) -> list[str]:
    """The HF module names of the adapted layers, from their adapter tensors' keys."""
    return sorted(
        {
            key.removeprefix(HF_PREFIX).removesuffix(suffix)
            for key in tensors
            for suffix in set(_HF_LEAVES.values())
            if key.startswith(HF_PREFIX) and key.endswith(suffix)
        }
    )


def save_hf_peft(
    params: Mapping[str, Any],
    lora: LoraConfig,
    family: ModelFamily,
    model_config: Any,
    out_dir: str,
    base_model_name: str,
    modules_to_save: Sequence[str] | None = None,
) -> None:
    """Writes an HF PEFT adapter of `lora.method` (`adapter_config.json`,
    `adapter_model.safetensors`).

    `PeftModel.from_pretrained(<HF base model>, out_dir)` then computes what our model does
    with these params. `modules_to_save` are our param-path prefixes of trained non-adapter
    modules saved whole (None: the family's `peft_modules_to_save`, its new task head);
    the PEFT task type is that of the family's bound head. Target modules are listed by full
    HF name, so e.g. `attention.output.dense` and `pooler.dense` are never confused.
    """
    mappings = family.hf_param_mappings(model_config)
    flat = flat_paths(params)
    if lora.method == "prompt":
        prompt = [v for p, v in flat.items() if p.rsplit("/", 1)[-1] == PROMPT_EMBEDDINGS]
        tensors, prefix = {PROMPT_EMBEDDINGS: np.asarray(prompt[0], np.float32)}, PROMPT_PREFIX
    else:
        tensors, prefix = hf_adapter_tensors(params, mappings), HF_PREFIX
    feedforward = [  # IA3's input-scaled modules
        m.hf_key.removesuffix(".weight")
        for m in mappings
        if m.path.removesuffix("kernel") + ia3.INPUT_SCALE in flat
    ]
    if modules_to_save is None:
        modules_to_save = family.peft_modules_to_save
    saved = set()
    for m in mappings:
        if m.path in flat and any(m.path.startswith(p + "/") for p in modules_to_save):
            tensors[prefix + m.hf_key] = param_to_hf(m, row_value(m, flat[m.path]))
            saved.add(m.hf_key.rsplit(".", 1)[0])
    adapter_config = {
        "task_type": family.head.peft_task_type,
        "base_model_name_or_path": model_files.base_model_reference(base_model_name),
        "modules_to_save": sorted(saved) or None,
        "inference_mode": True,
        **_method_config(lora, tensors, sorted(set(feedforward))),
    }
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(adapter_config, f, indent=2)
    safetensors.numpy.save_file(
        tensors, os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"}
    )


def _method_config(
    lora: LoraConfig, tensors: Mapping[str, np.ndarray], feedforward: list[str]
) -> dict[str, Any]:
    """The method's own keys of `adapter_config.json`."""
    if lora.method == "prompt":
        return {
            "peft_type": "PROMPT_TUNING",
            "num_virtual_tokens": lora.num_virtual_tokens,
            "token_dim": int(tensors[PROMPT_EMBEDDINGS].shape[1]),
            "num_transformer_submodules": 1,
            "prompt_tuning_init": "SAMPLE_VOCAB",
        }
    if lora.method == "ia3":
        return {
            "peft_type": "IA3",
            "target_modules": _modules(tensors),
            "feedforward_modules": feedforward,
            "fan_in_fan_out": False,
            "init_ia3_weights": True,
        }
    return {
        "peft_type": "LORA",
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": _modules(tensors),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": lora.method == "dora",
        "init_lora_weights": True,
    }
