"""Export a trained run as a Hugging Face model directory:
`python -m finetune_jax.export --workdir=... [--config=...] --out=DIR [--checkpoint=best]`.

LoRA is merged into the base weights, so DIR loads with plain transformers
(`AutoModelForCausalLM` / `AutoModelForSequenceClassification` /
`AutoModelForImageClassification.from_pretrained(DIR)`, `WhisperForConditionalGeneration`):
config, `model.safetensors` (float32) and the tokenizer files (for image models the image
processor, at the fine-tuned size; a speech model also its generation and feature-extractor
configs). A head transformers has no class for (segmentation, detection) goes to its own
safetensors file beside a `<prefix>Model` backbone (`HeadSpec.hf_file`), so
`Dinov2Model.from_pretrained(DIR)` loads the backbone with no unexpected weight. A PEFT run
(LoRA, DoRA, IA3) also gets its adapter in HF PEFT format in `DIR/adapter` for use on top of
the original base model; `--adapter_only` writes that adapter alone as DIR, the only export
of prompt tuning (its virtual tokens are an input, not a change to the weights, so they
cannot be merged). DIR is written
through a temporary sibling and renamed, and an existing DIR is never overwritten unless
asked: an export never destroys an earlier one halfway. DIR may be a `gs://` URL: the model is
written locally, then copied up (not atomically: object stores cannot rename a directory).
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

from finetune_jax.cli import define_run_config_flag, quiet_libraries, resolve_run_config, run_main
from finetune_jax.hf import adapters, model_files, saving
from finetune_jax.models import hf_mapping
from finetune_jax.models import lora as lora_lib
from finetune_jax.training import builder, run_status, workdir_files


def write_hf_model(
    setup: builder.Setup,
    params: Any,
    out_dir: str,
    overwrite: bool = False,
    adapter_only: bool = False,
) -> str:
    """Writes `params` (adapter merged) + config + tokenizer as an HF model directory, or
    with `adapter_only` the run's HF PEFT adapter alone.

    A URL `out_dir` (`gs://...`) is written to a local temporary directory first (safetensors
    and the tokenizer write local files only), then copied up with config.json last.
    """
    if not workdir_files.is_url(out_dir):
        return _write_local(setup, params, out_dir, overwrite, adapter_only)
    dest = workdir_files.workdir_path(out_dir)
    if dest.exists() and any(dest.iterdir()) and not overwrite:
        raise FileExistsError(
            f"export directory {dest} exists and is not empty; choose another --out or "
            "pass --overwrite"
        )
    with tempfile.TemporaryDirectory(prefix="export-") as tmp:
        local = _write_local(setup, params, os.path.join(tmp, "model"), adapter_only=adapter_only)
        if dest.exists():
            dest.rmtree()  # --overwrite: no files of the old export mix with the new
        # An object store cannot rename a directory, so the copy is not atomic; without
        # config.json an interrupted one does not load as a model.
        workdir_files.upload_tree(local, dest, last=("config.json",))
    return os.fspath(dest)


def _write_local(
    setup: builder.Setup,
    params: Any,
    out_dir: str,
    overwrite: bool = False,
    adapter_only: bool = False,
) -> str:
    params = jax.tree.map(np.asarray, jax.device_get(params))
    lora = builder.lora_config(setup.config)
    family, task = setup.family, setup.task

    def write_adapter(adapter_dir: str) -> None:
        adapters.save_hf_peft(
            params, lora, family, setup.model_config, adapter_dir, setup.config.model.name
        )

    if adapter_only:
        if lora is None:
            raise ValueError("--adapter_only: this run trained no adapter (peft.rank=0, LoRA)")
        return saving.write_dir(out_dir, write_adapter, overwrite)
    if lora is not None and lora.method == "prompt":
        raise ValueError(
            "peft.method=prompt cannot be merged into the base weights (its virtual tokens "
            "are an input, not a change to a kernel): export it with --adapter_only, the HF "
            "PEFT adapter that peft.PeftModel.from_pretrained loads onto the base model"
        )
    merged = params if lora is None else jax.tree.map(np.asarray, lora_lib.merge(params, lora))
    tensors = hf_mapping.params_to_hf(merged, family, setup.model_config)
    head_tensors = _own_file_head(tensors, family, setup.model_config)

    def write_extra(model_dir: str) -> None:
        for path in setup.kind.export_files(setup):  # e.g. a speech model's feature extractor
            shutil.copy(path, model_dir)
        if head_tensors:
            model_files.save_tensor_file(head_tensors, os.path.join(model_dir, family.head.hf_file))
        if lora is not None:
            write_adapter(os.path.join(model_dir, "adapter"))

    return saving.write_model_dir(
        out_dir,
        tensors,
        saving.exported_config(setup.hf_config, family, setup.kind.export_config(task)),
        setup.tokenizer,
        generation=setup.kind.export_generation(setup),
        write_extra=write_extra,
        overwrite=overwrite,
    )


def _own_file_head(tensors: dict[str, np.ndarray], family, model_config) -> dict[str, np.ndarray]:
    """The head's tensors, taken out of `tensors`, for a head written to its own file
    (`HeadSpec.hf_file`: transformers has no class with this head); {} otherwise."""
    if not family.head.hf_file:
        return {}
    keys = [m.hf_key for m in family.head.hf_rows(model_config)]
    return {key: tensors.pop(key) for key in keys if key in tensors}


def export(
    config: ml_collections.ConfigDict,
    workdir: str,
    out_dir: str,
    which: str = "best",
    overwrite: bool = False,
    adapter_only: bool = False,
) -> dict[str, Any]:
    """Restores a checkpoint of `workdir` ('best', 'latest' or a step) and exports it."""
    run_status.warn_if_unfinished(workdir)  # first: `train && export` of a preempted run
    setup = builder.build(config, workdir=workdir)
    step, params = setup.restore_params(workdir, which)
    path = out_dir
    if jax.process_index() == 0:
        path = write_hf_model(setup, params, out_dir, overwrite, adapter_only)
    return {"step": step, "out": path}


def main() -> None:
    config = define_run_config_flag()
    workdir = flags.DEFINE_string("workdir", None, "Workdir of the training run.")
    out = flags.DEFINE_string("out", None, "Directory (or gs:// URL) to write the HF model to.")
    which = flags.DEFINE_string("checkpoint", "best", "'best', 'latest' or a step number.")
    overwrite = flags.DEFINE_bool("overwrite", False, "Replace an existing --out directory.")
    adapter_only = flags.DEFINE_bool(
        "adapter_only",
        False,
        "Write only the run's HF PEFT adapter (the one export of peft.method=prompt).",
    )
    flags.mark_flags_as_required(["workdir", "out"])

    def run(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        quiet_libraries()
        result = export(
            resolve_run_config(config, workdir.value),
            workdir.value,
            out.value,
            which.value,
            overwrite.value,
            adapter_only.value,
        )
        print(json.dumps(result, indent=2))

    run_main(run)


if __name__ == "__main__":
    main()
