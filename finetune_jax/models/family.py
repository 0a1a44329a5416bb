"""What a model family must provide to plug into loading, training, export and LoRA.

A family is one model file (config, Flax modules, init) plus its HF mapping file; it declares
itself with one `ModelFamily` value and one line in the registry (`models/__init__.py`).
Everything else (streaming weights in, exporting them, LoRA adapters, presets) is generic
over these fields.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax

from finetune_jax.models.hf_mapping import HFMapping


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """An architecture family: its configs, modules per task kind, init and HF layout.

    Attributes:
      name: the family's name in messages.
      model_types: HF `model_type` values (config.json) the family serves.
      config_from_hf: (HF config dict, **overrides) -> the frozen config dataclass.
      heads: task kind ("classification", "causal_lm", ...) -> the Flax module class that
        computes that task's outputs; a task kind missing here is an error at build. A
        "causal_lm" module also returns its final hidden state with `return_hidden=True` and
        maps hidden [B, C, D] to float32 logits [B, C, V] with `logits_from_hidden`: the
        chunked LM loss (`model.lm_loss_chunk`) applies the head through it. A "seq2seq"
        module (encoder-decoder) has the same two, plus `encode`, `init_cache` and `decode`
        for generation (the contract is spelled out in `models/whisper.py`'s docstring).
      init_params: (config, rng) -> boxed params (logical axis names attached).
      hf_param_mappings: config -> one `HFMapping` per param (full path, full HF key); per
        layer of a stacked param (`layer` set) in the scanned layout.
      layer_stacks: config -> {stack path: layer count} of the stacked layer params in the
        scanned layout (`scan_layers`), {} unrolled; rules see a stacked leaf's layers as
        `<stack>_<i>/...`, the unrolled layout's paths.
      new_params: param path prefixes a fine-tune creates (a new task head): initialised
        from the seed, never read from the checkpoint.
      optional_params: path prefixes read when the checkpoint has them and initialised
        otherwise (e.g. BERT's pooler, absent from some checkpoints).
      bare_prefix: an HF key prefix that checkpoints of the bare backbone leave out
        (`bert.`: a `BertModel` file says `embeddings...`, a classifier's `bert.embeddings...`).
      strict: whether a checkpoint tensor with no place in the model is an error (decoders,
        whose every tensor matters) or ignored (encoders, whose files carry other heads).
      ignored_tensors: suffixes of buffers some checkpoints carry and no param needs.
      constant_tensors: config -> HF tensors that are fixed functions of the config and no
        param of ours (Whisper's frozen sinusoid table): written on export (`params_to_hf`)
        so transformers finds them; list them in `ignored_tensors` too (not read on load).
      head_bias: path of the new head's bias (`model.head_bias_init=prior`), or None.
      hf_class_names: HF `model_type` -> the prefix of its transformers classes (`Bert`,
        `Qwen2`); export names the task model `<prefix>ForCausalLM` etc.
      peft_task_type: HF PEFT task type of exported adapters, per task kind.
      peft_modules_to_save: path prefixes of trained non-LoRA modules saved whole in an HF
        PEFT adapter (the new head).
    """

    name: str
    model_types: tuple[str, ...]
    config_from_hf: Callable[..., Any]
    heads: Mapping[str, type]
    init_params: Callable[[Any, jax.Array], Any]
    hf_param_mappings: Callable[[Any], list[HFMapping]]
    layer_stacks: Callable[[Any], Mapping[str, int]] = lambda config: {}
    new_params: tuple[str, ...] = ()
    optional_params: tuple[str, ...] = ()
    bare_prefix: str = ""
    strict: bool = False
    ignored_tensors: tuple[str, ...] = ()
    constant_tensors: Callable[[Any], Mapping[str, Any]] = lambda config: {}
    head_bias: str | None = None
    hf_class_names: Mapping[str, str] = dataclasses.field(default_factory=dict)
    peft_task_type: Mapping[str, str] = dataclasses.field(default_factory=dict)
    peft_modules_to_save: tuple[str, ...] = ()

    def module_for(self, config: Any, task_kind: str) -> Any:
        """The Flax module computing `task_kind`'s outputs with this config."""
        if task_kind not in self.heads:
            raise ValueError(
                f"model family {self.name!r} has no head for task kind {task_kind!r}; "
                f"it supports {sorted(self.heads)}: pick a model of another family "
                "(model.name) or a task of a supported kind (data.task)"
            )
        return self.heads[task_kind](config)
