"""Model registry: HF `model_type` -> the `ModelFamily` that implements it.

Adding an architecture means adding its model file (config, modules, `FAMILY`), its HF
mapping file, a parity test, and one entry in `FAMILIES` below.
"""

from __future__ import annotations

from finetune_jax.models import bert, llama, marian, vit, whisper
from finetune_jax.models.family import ModelFamily

FAMILIES: tuple[ModelFamily, ...] = (
    bert.FAMILY,
    llama.FAMILY,
    vit.VIT_FAMILY,
    vit.DINOV2_FAMILY,
    whisper.FAMILY,
    marian.FAMILY,
)

_BY_MODEL_TYPE = {model_type: f for f in FAMILIES for model_type in f.model_types}


def family_for(model_type: str) -> ModelFamily:
    """The family registered for an HF `model_type` (from config.json)."""
    try:
        return _BY_MODEL_TYPE[model_type]
    except KeyError:
        raise ValueError(
            f"Unsupported model_type {model_type!r}; supported: {sorted(_BY_MODEL_TYPE)}"
        ) from None
