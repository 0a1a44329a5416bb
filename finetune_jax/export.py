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
import shutil
import tempfile
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from finetune_jax import experiment, peft, weights
from finetune_jax.cli import quiet_libraries, run_main
from finetune_jax.models import get_model_module

_CAUSAL_LM_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM",
}


def hf_config_for(exp: experiment.Experiment) -> dict[str, Any]:
    """The exported config.json: the pretrained one, with the fine-tuned head's shape."""
    config = {k: v for k, v in exp.hf_config.items() if k not in ("_name_or_path", "dtype")}
    config["torch_dtype"] = "float32"
    model_type = config.get("model_type", "")
    if exp.task.kind == "causal_lm":
        config["architectures"] = [_CAUSAL_LM_ARCHITECTURES.get(model_type, "LlamaForCausalLM")]
        return config
    task = exp.task
    config["architectures"] = ["BertForSequenceClassification"]
    config["num_labels"] = task.num_labels
    if task.is_regression:
        config["problem_type"] = "regression"
        config["id2label"], config["label2id"] = {0: "score"}, {"score": 0}
    else:
        config["problem_type"] = "single_label_classification"
        config["id2label"] = dict(enumerate(task.label_names))
        config["label2id"] = {name: i for i, name in enumerate(task.label_names)}
    return config


def write_hf_model(
    exp: experiment.Experiment, params: Any, out_dir: str, overwrite: bool = False
) -> str:
    """Writes `params` (LoRA merged) + config + tokenizer as an HF model directory."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite:
        raise FileExistsError(
            f"export directory {out_dir} exists and is not empty; choose another --out or "
            "pass --overwrite"
        )
    params = jax.tree.map(np.asarray, jax.device_get(params))
    lora = experiment.lora_config(exp.config)
    model_lib = get_model_module(exp.hf_config.get("model_type", ""))
    merged = params if lora is None else jax.tree.map(np.asarray, peft.merge(params, lora))
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)
    # mkdtemp makes the directory owner-only (0700); give the export the mode a plain
    # mkdir would, so serving accounts and colleagues can read it.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        weights.write_safetensors(
            model_lib.to_hf(merged, exp.model_config), tmp, hf_config_for(exp)
        )
        exp.tokenizer.save_pretrained(tmp)
        if exp.task.kind == "causal_lm":
            _write_generation_config(exp, tmp)
        if lora is not None:
            base = exp.config.model.name
            peft.save_hf_peft(
                params, lora, model_lib, exp.model_config, os.path.join(tmp, "adapter"), base
            )
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _write_generation_config(exp: experiment.Experiment, out_dir: str) -> None:
    """Token ids transformers' `generate` needs (a GGUF-derived config may lack them)."""
    tok = exp.tokenizer
    hf = exp.hf_config
    config = {  # a key present as null in the model config falls back to the tokenizer's
        "bos_token_id": tok.bos_token_id if hf.get("bos_token_id") is None else hf["bos_token_id"],
        "eos_token_id": tok.eos_token_id if hf.get("eos_token_id") is None else hf["eos_token_id"],
        "pad_token_id": tok.pad_token_id,
    }
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({k: v for k, v in config.items() if v is not None}, f, indent=2)


def export(
    config: ml_collections.ConfigDict,
    workdir: str,
    out_dir: str,
    which: str = "best",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Restores a checkpoint of `workdir` ('best', 'latest' or a step) and exports it."""
    exp = experiment.build(config)
    step, params = exp.restore_params(workdir, which)
    path = out_dir
    if jax.process_index() == 0:
        path = write_hf_model(exp, params, out_dir, overwrite)
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
