"""LoRA adapter files: the LoRA leaves alone as safetensors keyed by param path, and the
HF PEFT format (`adapter_config.json` + `adapter_model.safetensors`) that
`peft.PeftModel.from_pretrained` loads onto the transformers model."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import safetensors.numpy

from finetune_jax.hf import model_files
from finetune_jax.models.family import ModelFamily
from finetune_jax.models.hf_mapping import HFMapping, param_to_hf, row_value
from finetune_jax.models.lora import (
    LORA_A,
    LORA_B,
    LoraConfig,
    flat_paths,
    is_lora_path,
    lora_params,
    nested,
)

HF_PREFIX = "base_model.model."  # PEFT's key prefix for the wrapped model's modules


def save_adapter(params: Mapping[str, Any], path: str, lora: LoraConfig | None = None) -> None:
    """Writes the LoRA leaves as safetensors keyed by '/'-joined path (+ the config, if given)."""
    tensors = {p: np.ascontiguousarray(v) for p, v in flat_paths(lora_params(params)).items()}
    metadata = {"lora": json.dumps(dataclasses.asdict(lora))} if lora is not None else None
    safetensors.numpy.save_file(tensors, path, metadata=metadata)


def load_adapter(params: Mapping[str, Any], path: str) -> dict[str, Any]:
    """`params` with its LoRA leaves replaced by those saved at `path`.

    The file must hold exactly the model's LoRA leaves at their shapes; anything else is a
    ValueError naming the paths, so an adapter never half-loads into another model.
    """
    loaded = safetensors.numpy.load_file(path)
    flat = flat_paths(params)
    ours = {p for p in flat if is_lora_path(p)}
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


def hf_lora_tensors(
    params: Mapping[str, Any], mappings: Sequence[HFMapping]
) -> dict[str, np.ndarray]:
    """LoRA leaves -> HF PEFT tensors `<module>.lora_A.weight` [r, in], `lora_B.weight` [out, r].

    `mappings` are `HFMapping` rows with full paths and keys. Our kernel flattened to
    [in, out] is the HF Linear weight transposed, so A [*in, r] -> [in, r] -> A.T and
    B [r, *out] -> [r, out] -> B.T; split-head kernels flatten in HF's row-major order.
    Stacked LoRA leaves (scanned layers) give one HF module's tensors per layer.
    """
    flat = flat_paths(params)
    tensors, mapped = {}, set()
    for m in mappings:
        layer = m.path.removesuffix("kernel")
        if not m.path.endswith("/kernel") or layer + LORA_A not in flat:
            continue
        if not m.transpose or len(m.hf_shape) != 2:
            raise ValueError(f"{m.path} is not a torch Linear weight; HF PEFT cannot adapt it")
        out_features, in_features = m.hf_shape
        a = np.asarray(row_value(m, flat[layer + LORA_A]), np.float32).reshape(in_features, -1)
        b = np.asarray(row_value(m, flat[layer + LORA_B]), np.float32).reshape(-1, out_features)
        module = HF_PREFIX + m.hf_key.removesuffix(".weight")
        tensors[module + ".lora_A.weight"] = np.ascontiguousarray(a.T)
        tensors[module + ".lora_B.weight"] = np.ascontiguousarray(b.T)
        mapped |= {layer + LORA_A, layer + LORA_B}
    unmapped = sorted(p for p in flat if is_lora_path(p) and p not in mapped)
    if unmapped:
        raise ValueError(f"no HF weight for the kernels of these LoRA params: {unmapped[:4]}")
    return tensors


def save_hf_peft(
    params: Mapping[str, Any],
    lora: LoraConfig,
    family: ModelFamily,
    model_config: Any,
    out_dir: str,
    base_model_name: str,
    modules_to_save: Sequence[str] | None = None,
) -> None:
    """Writes an HF PEFT LoRA adapter (`adapter_config.json`, `adapter_model.safetensors`).

    `PeftModel.from_pretrained(<HF base model>, out_dir)` then computes what our model does
    with these params. `modules_to_save` are our param-path prefixes of trained non-LoRA
    modules saved whole (None: the family's `peft_modules_to_save`, its new task head);
    the PEFT task type is that of the family's bound head. Target modules are listed by full
    HF name, so e.g. `attention.output.dense` and `pooler.dense` are never confused.
    """
    mappings = family.hf_param_mappings(model_config)
    tensors = hf_lora_tensors(params, mappings)
    targets = sorted({k.removeprefix(HF_PREFIX).rsplit(".lora_", 1)[0] for k in tensors})
    if modules_to_save is None:
        modules_to_save = family.peft_modules_to_save
    flat, saved = flat_paths(params), set()
    for m in mappings:
        if m.path in flat and any(m.path.startswith(p + "/") for p in modules_to_save):
            tensors[HF_PREFIX + m.hf_key] = param_to_hf(m, row_value(m, flat[m.path]))
            saved.add(m.hf_key.rsplit(".", 1)[0])
    adapter_config = {
        "peft_type": "LORA",
        "task_type": family.head.peft_task_type,
        "base_model_name_or_path": model_files.base_model_reference(base_model_name),
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": targets,
        "modules_to_save": sorted(saved) or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(adapter_config, f, indent=2)
    safetensors.numpy.save_file(
        tensors, os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"}
    )
