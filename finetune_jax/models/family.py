"""What a model family must provide to plug into loading, training, export and LoRA.

A family is one model file (config, Flax modules, init) plus its HF mapping file; it declares
itself with one `ModelFamily` value and one line in the registry (`models/__init__.py`).
Each task kind the family serves has a `HeadSpec` in `heads`: the module computing that
kind's outputs and everything loading, export and PEFT need to know about its head.
Everything else (streaming weights in, exporting them, LoRA adapters, presets) is generic
over these fields.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax

from finetune_jax.models.hf_mapping import HFMapping, stack_layers


@dataclasses.dataclass(frozen=True)
class HeadSpec:
    """One task kind's head on a family's backbone.

    Attributes:
      module: the Flax module class computing the kind's outputs from the config. A
        "causal_lm" module also returns its final hidden state with `return_hidden=True` and
        maps hidden [B, C, D] to float32 logits [B, C, V] with `logits_from_hidden` (the
        chunked LM loss applies the head through it). A "speech_recognition" module
        (encoder-decoder) has the same two, plus `encode`, `init_cache` and `decode` for
        generation (the contract is spelled out in `models/whisper.py`'s docstring).
      hf_rows: config -> the head's `HFMapping` rows (full paths and HF keys), beside the
        family's backbone rows.
      new_params: param path prefixes a fine-tune creates (a new task head): initialised
        from the seed, never read from the checkpoint.
      bias: path of the new head's bias (`model.head_bias_init=prior`), or None.
      hf_class_suffix: transformers' class-name suffix of the model with this head
        (`ForTokenClassification`); export writes `<family prefix><suffix>`.
      peft_task_type: HF PEFT task type of exported adapters (None: PEFT has none).
      modules_to_save: path prefixes of trained non-LoRA modules saved whole in an HF PEFT
        adapter (the new head).
      trained: regex of the params `optim.head='auto'` means: the head that the
        linear_probe / bitfit / top_k_layers / lora presets train ("" = none: an LM head
        tied to the embedding).
      hf_file: "" = an export writes the head's tensors into model.safetensors with the
        backbone's; a file name = into that safetensors file beside it, for heads
        transformers has no class for (the backbone then loads as `<prefix>Model` with no
        unexpected keys, and the head is read from its own file).
    """

    module: type
    hf_rows: Callable[[Any], list[HFMapping]] = lambda config: []
    new_params: tuple[str, ...] = ()
    bias: str | None = None
    hf_class_suffix: str = ""
    peft_task_type: str | None = None
    modules_to_save: tuple[str, ...] = ()
    trained: str = ""
    hf_file: str = ""


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """An architecture family: its configs, heads per task kind, init and HF layout.

    Attributes:
      name: the family's name in messages.
      model_types: HF `model_type` values (config.json) the family serves.
      config_from_hf: (HF config dict, **overrides) -> the frozen config dataclass.
      heads: task kind name -> its `HeadSpec`; a kind missing here is an error at build.
      init: (module class, config, rng) -> boxed params (logical axis names attached).
      backbone_mappings: config -> one `HFMapping` per backbone param (full path, full HF
        key), one row per layer (unstacked); `hf_param_mappings` adds the head's rows and
        stacks them for the scanned layout.
      layer_stacks: config -> {stack path: layer count} of the stacked layer params in the
        scanned layout (`scan_layers`), {} unrolled; rules see a stacked leaf's layers as
        `<stack>_<i>/...`, the unrolled layout's paths.
      layer_pattern: regex whose group 1 is a param's layer index (`optim.layer='auto'`).
      lora_targets: the kernels LoRA and DoRA adapt by default (`peft.targets='auto'`).
      ia3_targets / ia3_feedforward: the kernels IA3 scales by default, and those of them
        scaled on their input (HF PEFT's IA3 `target_modules` / `feedforward_modules` for
        the model type; "" = none named: set `peft.targets` / `peft.feedforward`).
      quantize_targets: the frozen kernels `peft.quantize` stores quantized by default (the
        attention and MLP projections; "" = none named: set `peft.quantize_targets`).
      word_embeddings: path of the vocabulary embedding table, for families whose models
        take prompt tuning's virtual tokens (its rows initialise them); "" = they take none.
      dropout_keys: config fields `model.dropout` sets (empty: the family has no dropout).
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
      hf_class_names: HF `model_type` -> the prefix of its transformers classes (`Bert`,
        `Qwen2`).
      kind: the head this value is bound to (`with_head`); "" = the first of `heads`.
    """

    name: str
    model_types: tuple[str, ...]
    config_from_hf: Callable[..., Any]
    heads: Mapping[str, HeadSpec]
    init: Callable[[type, Any, jax.Array], Any]
    backbone_mappings: Callable[[Any], list[HFMapping]]
    layer_stacks: Callable[[Any], Mapping[str, int]] = lambda config: {}
    layer_pattern: str = r".*/layer_(\d+)/.*"
    lora_targets: str = ""
    ia3_targets: str = ""
    ia3_feedforward: str = ""
    quantize_targets: str = ""
    word_embeddings: str = ""
    dropout_keys: tuple[str, ...] = ()
    optional_params: tuple[str, ...] = ()
    bare_prefix: str = ""
    strict: bool = False
    ignored_tensors: tuple[str, ...] = ()
    constant_tensors: Callable[[Any], Mapping[str, Any]] = lambda config: {}
    hf_class_names: Mapping[str, str] = dataclasses.field(default_factory=dict)
    kind: str = ""

    def with_head(self, kind: str) -> ModelFamily:
        """This family bound to `kind`'s head; a kind without a head is an error."""
        if kind not in self.heads:
            raise ValueError(
                f"model family {self.name!r} has no head for task kind {kind!r}; "
                f"it supports {sorted(self.heads)}: pick a model of another family "
                "(model.name) or a task of a supported kind (data.task)"
            )
        return dataclasses.replace(self, kind=kind)

    @property
    def head(self) -> HeadSpec:
        """The bound head (the first of `heads` when none is bound)."""
        return self.heads[self.kind or next(iter(self.heads))]

    def module_for(self, config: Any, task_kind: str | None = None) -> Any:
        """The Flax module computing `task_kind`'s outputs (default: the bound head's)."""
        family = self if task_kind is None else self.with_head(task_kind)
        return family.head.module(config)

    def init_params(self, config: Any, rng: jax.Array) -> Any:
        """Boxed params of the backbone and the bound head."""
        return self.init(self.head.module, config, rng)

    def hf_param_mappings(self, config: Any) -> list[HFMapping]:
        """Every param of the backbone and the bound head: full paths and HF keys (stacked
        rows, one per layer, in the scanned layout)."""
        rows = [*self.backbone_mappings(config), *self.head.hf_rows(config)]
        return stack_layers(rows, self.layer_stacks(config))

    @property
    def new_params(self) -> tuple[str, ...]:
        return self.head.new_params

    @property
    def head_bias(self) -> str | None:
        return self.head.bias

    @property
    def peft_modules_to_save(self) -> tuple[str, ...]:
        return self.head.modules_to_save

    def class_name(self, model_type: str) -> str:
        """transformers' class of this model type with the bound head (`BertForTokenClassification`)."""
        return self.hf_class_names[model_type] + self.head.hf_class_suffix
