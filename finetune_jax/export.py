"""Export a trained run as a Hugging Face model directory:
`python -m finetune_jax.export --config=... --workdir=... --out=DIR [--checkpoint=best]`.

LoRA is merged into the base weights, so DIR loads with plain transformers
(`AutoModelForCausalLM` / `AutoModelForSequenceClassification.from_pretrained(DIR)`): config,
`model.safetensors` (float32) and the tokenizer files. A LoRA run also gets its adapter in HF
PEFT format in `DIR/adapter` for use on top of the original base model. DIR is written
through a temporary sibling and renamed, and an existing DIR is never overwritten unless
asked: an export never destroys an earlier one halfway.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from finetune_jax.cli import quiet_libraries, run_main
from finetune_jax.hf import adapters, saving
from finetune_jax.models import hf_mapping
from finetune_jax.models import lora as lora_lib
from finetune_jax.training import builder


def write_hf_model(setup: builder.Setup, params: Any, out_dir: str, overwrite: bool = False) -> str:
    """Writes `params` (LoRA merged) + config + tokenizer as an HF model directory."""
    params = jax.tree.map(np.asarray, jax.device_get(params))
    lora = builder.lora_config(setup.config)
    merged = params if lora is None else jax.tree.map(np.asarray, lora_lib.merge(params, lora))
    family, task = setup.family, setup.task

    def write_adapter(model_dir: str) -> None:
        adapter_dir = os.path.join(model_dir, "adapter")
        adapters.save_hf_peft(
            params, lora, family, setup.model_config, task.kind, adapter_dir, setup.config.model.name
        )

    causal = task.kind == "causal_lm"
    return saving.write_model_dir(
        out_dir,
        hf_mapping.params_to_hf(merged, family, setup.model_config),
        saving.exported_config(setup.hf_config, family, task),
        setup.tokenizer,
        generation=saving.generation_config(setup.tokenizer, setup.hf_config) if causal else None,
        write_extra=write_adapter if lora is not None else None,
        overwrite=overwrite,
    )


def export(
    config: ml_collections.ConfigDict,
    workdir: str,
    out_dir: str,
    which: str = "best",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Restores a checkpoint of `workdir` ('best', 'latest' or a step) and exports it."""
    setup = builder.build(config)
    step, params = setup.restore_params(workdir, which)
    path = out_dir
    if jax.process_index() == 0:
        path = write_hf_model(setup, params, out_dir, overwrite)
    return {"step": step, "out": path}


def main() -> None:
    config = config_flags.DEFINE_config_file(
        "config", None, "Experiment config file (configs/**.py)."
    )
    workdir = flags.DEFINE_string("workdir", None, "Workdir of the training run.")
    out = flags.DEFINE_string("out", None, "Directory to write the HF model to.")
    which = flags.DEFINE_string("checkpoint", "best", "'best', 'latest' or a step number.")
    overwrite = flags.DEFINE_bool("overwrite", False, "Replace an existing --out directory.")
    flags.mark_flags_as_required(["config", "workdir", "out"])

    def run(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        quiet_libraries()
        result = export(config.value, workdir.value, out.value, which.value, overwrite.value)
        print(json.dumps(result, indent=2))

    run_main(run)


if __name__ == "__main__":
    main()
