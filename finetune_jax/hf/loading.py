"""Build a model's params from a pretrained checkpoint (HF safetensors directory or GGUF file).

One mechanism for every model family: the family's `HFMapping` rows say which checkpoint
tensor fills which param; params the checkpoint does not have (a new task head, an absent
optional pooler, LoRA adapters) come from the family's init with the run's seed.
"""

from __future__ import annotations

import logging
from typing import Any

import flax.linen as nn
import jax

from finetune_jax import tree_paths
from finetune_jax.hf import model_files
from finetune_jax.models import hf_mapping
from finetune_jax.models import lora as lora_lib
from finetune_jax.models.family import ModelFamily


def init_values(family: ModelFamily, config: Any, seed: int, paths: list[str]) -> dict[str, Any]:
    """Unboxed init values of only the '/'-joined `paths`, equal to `init_params(seed)`'s.

    Under jit XLA drops the random draws for everything not returned, so a new head costs
    nothing like initialising the 30k x 384 embedding just to overwrite it.
    """

    def init(rng: jax.Array) -> dict[str, Any]:
        params = nn.meta.unbox(family.init_params(config, rng))
        return {path: tree_paths.get_path(params, path) for path in paths}

    return jax.device_get(jax.jit(init)(jax.random.PRNGKey(seed)))


def fresh_paths(family: ModelFamily, config: Any, missing: list[str]) -> list[str]:
    """Params initialised rather than loaded: new head, absent optional parts, LoRA leaves."""
    paths = [*family.new_params, *missing]
    if config.lora is not None:
        init = lambda rng: nn.meta.unbox(family.init_params(config, rng))
        abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
        paths += lora_lib.lora_paths(tree_paths.param_paths(abstract))
    return paths


def load_pretrained(
    family: ModelFamily,
    model_ref: str,
    task_kind: str,
    seed: int = 0,
    **overrides: Any,
) -> tuple[Any, nn.Module, dict[str, Any]]:
    """(config, module, params) of `family` for `task_kind` from a checkpoint.

    `model_ref` is an HF directory, a `.gguf` file, or a name `model_files` resolves;
    `overrides` set config fields (dtype, remat, lora, num_labels, dropout...). Params are
    unboxed float32 numpy arrays on the host, so the caller decides their placement.
    """
    hf_config, tensors = model_files.read_checkpoint(model_ref)
    model_type = hf_config.get("model_type", family.model_types[0])
    if model_type not in family.model_types:
        raise ValueError(f"{model_ref} holds model_type {model_type!r}, not {family.model_types}")
    config = family.config_from_hf(hf_config, **overrides)
    module = family.module_for(config, task_kind)
    params, missing = hf_mapping.params_from_hf(tensors, family, config)
    del tensors
    if missing:
        logging.warning(
            "%s has no weights for %s; keeping freshly initialised values.", model_ref, missing
        )
    fresh = fresh_paths(family, config, missing)
    for path, value in init_values(family, config, seed, fresh).items():
        tree_paths.set_path(params, path, value)
    return config, module, params
