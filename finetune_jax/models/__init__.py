"""Model registry: HF `model_type` -> the module that implements it.

Each model module provides a `*Config.from_hf`, the Flax modules, `from_hf` / `to_hf` weight
conversion, `init_params` and `load_pretrained`. Adding an architecture means adding its file
and one line here.
"""

from __future__ import annotations

import types

from finetune_jax.models import bert, llama

MODELS: dict[str, types.ModuleType] = {
    "bert": bert,
    "llama": llama,
    "qwen2": llama,
    "mistral": llama,
}


def get_model_module(model_type: str) -> types.ModuleType:
    """Returns the model module registered for an HF `model_type` (from config.json)."""
    try:
        return MODELS[model_type]
    except KeyError:
        raise ValueError(
            f"Unsupported model_type {model_type!r}; supported: {sorted(MODELS)}"
        ) from None
