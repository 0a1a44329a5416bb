"""Build a run's `Setup` from its config: task, tokenizer, model, optimizer, mesh, steps.

`train`, `eval`, `export` and the tools all start here, so they can never disagree about
how a config maps to a model, an optimizer or a sharding.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import ml_collections

from finetune_jax import config as config_lib
from finetune_jax import config_ranges, tasks, tree_paths
from finetune_jax.cluster import sharding
from finetune_jax.hf import loading, model_files
from finetune_jax.models import family_for, quantization, quantized_kernels
from finetune_jax.models import lora as lora_lib
from finetune_jax.models.family import ModelFamily
from finetune_jax.tasks.kind import check_data_keys
from finetune_jax.training import checkpoints, optim, steps, workdir_files
from finetune_jax.training.setup import Setup
from finetune_jax.training.state import create_train_state

AUTO = "auto"
PRESETS_FOR_ADAPTERS = ("lora", "peft", "rules")  # presets that leave the base frozen


def lora_config(config: ml_collections.ConfigDict) -> lora_lib.LoraConfig | None:
    """`config.peft` as the adapter config of its method (None when off), checked against
    `config.optim`; every mistake is a ValueError naming the key, before anything loads.

    An adapter under a preset that trains the base weights (`full`, `llrd`, ...) would
    silently be full fine-tuning plus an adapter, so only `lora` (alias `peft`) or explicit
    `rules` are accepted. Keys the method would silently ignore are refused.
    """
    peft, preset = config.peft, config.optim.preset
    if peft.method not in lora_lib.METHOD_LEAVES:
        hint = config_lib.did_you_mean(peft.method, lora_lib.METHOD_LEAVES)
        raise ValueError(
            f"peft.method={peft.method!r} is not one of {', '.join(lora_lib.METHOD_LEAVES)}"
            + (f"; {hint}" if hint else "")
        )
    _check_quantize(peft)
    ignored = {
        "peft.dropout": peft.dropout != 0 and peft.method not in lora_lib.LOW_RANK,
        "peft.targets": peft.targets not in (AUTO, "") and peft.method == "prompt",
        "peft.feedforward": peft.feedforward not in (AUTO, "") and peft.method != "ia3",
    }
    for key, set_in_vain in ignored.items():
        if set_in_vain:
            raise ValueError(
                f"{key} is set, but peft.method={peft.method!r} does not read it: leave it at "
                "its default (README 'PEFT methods' lists which method reads which key)"
            )
    if peft.method == "dora" and peft.rank == 0:
        raise ValueError(f"peft.method={peft.method!r} needs peft.rank > 0 (its rank)")
    lora = lora_lib.LoraConfig.from_config(peft)
    if lora is not None and preset not in PRESETS_FOR_ADAPTERS:
        raise ValueError(
            f"peft.method={lora.method!r} with optim.preset={preset!r} would train the base "
            "weights too; set optim.preset=lora (adapter params + head "
            "trainable, rest frozen) or write explicit optim.rules with optim.preset=rules"
        )
    if lora is None and peft.quantize != "none":
        raise ValueError(
            f"peft.quantize={peft.quantize!r} stores the frozen base quantized under an adapter "
            "(QLoRA), but no adapter is on: set peft.rank > 0 (LoRA) or another peft.method"
        )
    if lora is None and preset in PRESETS_FOR_ADAPTERS[:2]:
        raise ValueError(
            f"optim.preset={preset} needs adapter params: set peft.rank > 0 (LoRA) or "
            "another peft.method"
        )
    return lora


def _check_quantize(peft: ml_collections.ConfigDict) -> None:
    """`peft.quantize` is one of the formats (a misspelt one names the closest), and
    `peft.quantize_targets` is left alone when nothing is quantized."""
    if peft.quantize not in quantization.METHODS:
        hint = config_lib.did_you_mean(peft.quantize, quantization.METHODS)
        raise ValueError(
            f"peft.quantize={peft.quantize!r} is not one of {', '.join(quantization.METHODS)}"
            + (f"; {hint}" if hint else "")
        )
    if peft.quantize == "none" and peft.quantize_targets not in (AUTO, ""):
        raise ValueError(
            "peft.quantize_targets is set, but peft.quantize='none' quantizes nothing: set "
            "peft.quantize=nf4, int8 or q4_1, or leave peft.quantize_targets at 'auto'"
        )


def build(
    config: ml_collections.ConfigDict,
    devices: list[jax.Device] | None = None,
    hf_config: dict[str, Any] | None = None,
    workdir: str | None = None,
) -> Setup:
    """Resolve the model and task, lay out params and state on the mesh, and jit the steps.

    No weights are read here: `Setup.pretrained_params` / `initial_state` stream them when a
    run needs them (a resumed run never does). With `hf_config` (a model's config.json) the
    build is abstract, for preflight: no checkpoint, tokenizer or data is touched at all.
    `devices` (default: all devices of all processes) is what `config.mesh` is laid over.
    A `workdir` of an earlier run supplies the class names it trained with.
    The returned `Setup.config` has the family's defaults in place of 'auto' values.
    """
    config_ranges.check_ranges(config)  # every numeric key in its range, before anything loads
    lora_config(config)  # fail before any loading
    rounding = optim.rounding_mode(config)  # likewise: a misspelt optim.bf16_rounding
    task = tasks.task_for(config.data)
    kind = tasks.kind_of(task)
    _check_task_options(config, kind, task)
    abstract = hf_config is not None
    model_ref = "" if abstract else _resolve_model(config.model.name)
    hf_config = hf_config if abstract else model_files.read_config(model_ref)
    family = family_for(hf_config.get("model_type", "")).with_head(kind.name)
    config = with_family_defaults(config, family)
    preprocessor = None if abstract else kind.preprocessor(config, model_ref)
    saved_names = workdir_files.read_label_names(workdir)
    if abstract:
        data, task = None, kind.resolve(config, task, saved_names)
    else:
        data = kind.loader(config, task, preprocessor, model_ref, saved_names)
        task = data.task  # class names may come from the data (or the run's saved names)
    model_config = _model_config(config, kind, task, family, hf_config, model_ref or "config.model")
    module = family.module_for(model_config)

    mesh = sharding.make_mesh(config.mesh, devices, config.mesh_dcn)
    rules = sharding.logical_rules(config)
    boxed = jax.eval_shape(lambda: family.init_params(model_config, jax.random.key(0)))
    quantized_kernels.check_targets(model_config.lora, tree_paths.param_paths(nn.meta.unbox(boxed)))
    params_sharding = sharding.param_shardings(boxed, mesh, rules)
    abstract_params = checkpoints.abstract_with_shardings(nn.meta.unbox(boxed), params_sharding)
    groups = optim.param_groups(config.optim, abstract_params, family.layer_stacks(model_config))
    tx, lr_fn = optim.make_optimizer(
        config.optim, groups, config.train.max_steps, rounding, config.seed
    )
    placement = _placement(config, mesh, rules, params_sharding, abstract_params, tx)
    objective = objective_for(config, kind, task, module)
    train_step, eval_step = _jit_steps(config, objective, groups, tx, lr_fn, placement)
    return Setup(
        config=config,
        kind=kind,
        task=task,
        data=data,
        tokenizer=preprocessor,
        model_ref=model_ref,
        hf_config=hf_config,
        family=family,
        model_config=model_config,
        module=module,
        abstract_params=abstract_params,
        param_overrides=_head_bias_override(config, family, abstract_params, data),
        groups=groups,
        tx=tx,
        lr_fn=lr_fn,
        mesh=mesh,
        state_sharding=placement.state,
        batch_sharding=placement.batch,
        train_step=train_step,
        eval_step=eval_step,
        predict_step=_jit_predict_step(config, kind, module, placement),
        scorer=kind.evaluator(config, module, data, preprocessor),
    )


def with_family_defaults(
    config: ml_collections.ConfigDict, family: ModelFamily
) -> ml_collections.ConfigDict:
    """A copy of `config` with the family's own values where it says 'auto': the trained
    head (`optim.head`, of the bound head), the layer regex (`optim.layer`), the PEFT
    method's targets (`peft.targets`, `peft.feedforward`) and the kernels `peft.quantize`
    stores quantized (`peft.quantize_targets`)."""
    config = copy.deepcopy(config)
    method, quantized = config.peft.method, config.peft.quantize != "none"
    targets = {"ia3": family.ia3_targets, "prompt": ""}.get(method, family.lora_targets)
    defaults = {
        ("optim", "head"): family.head.trained,
        ("optim", "layer"): family.layer_pattern,
        ("peft", "targets"): targets,
        ("peft", "feedforward"): family.ia3_feedforward if method == "ia3" else "",
        ("peft", "quantize_targets"): family.quantize_targets if quantized else "",
    }
    adapter_on = method != "lora" or config.peft.rank > 0
    for (section, key), value in defaults.items():
        if config[section][key] != AUTO:
            continue
        if (
            not value
            and (section, key) == ("peft", "targets")
            and adapter_on
            and method != "prompt"
        ):
            raise ValueError(
                f"peft.targets='auto': model family {family.name!r} names no default "
                f"{method} targets; set peft.targets to a regex over kernel paths"
                + (" (and peft.feedforward)" if method == "ia3" else "")
            )
        if (section, key) == ("peft", "quantize_targets") and not value and quantized:
            raise ValueError(
                f"peft.quantize_targets='auto': model family {family.name!r} names no default "
                "kernels to quantize; set peft.quantize_targets to a regex over kernel paths"
            )
        config[section][key] = value
    if method == "prompt" and not family.word_embeddings:
        raise ValueError(
            f"peft.method=prompt: model family {family.name!r} takes no virtual tokens; "
            "prompt tuning serves the bert and llama families (use lora, dora or ia3 here)"
        )
    return config


def _model_config(config, kind, task, family: ModelFamily, hf_config, source) -> Any:
    """The family's model config: the checkpoint's architecture with the run's settings."""
    return loading.model_config(
        family,
        hf_config,
        source,
        dtype=config.model.dtype,
        param_dtype=config.model.param_dtype,
        remat=config.model.remat,
        scan_layers=config.model.scan_layers,
        lora=lora_config(config),
        **kind.model_overrides(config, task),
        **_dropout_overrides(config, family),
    )


@dataclasses.dataclass(frozen=True)
class _Placement:
    mesh: jax.sharding.Mesh
    rules: list[tuple[str, Any]]
    params: Any
    state: Any
    batch: jax.sharding.NamedSharding


def _placement(config, mesh, rules, params_sharding, abstract_params, tx) -> _Placement:
    """The shardings of state and batches, from the params' and the config's rules."""
    create = functools.partial(create_train_state, tx=tx, seed=config.seed)
    state_sharding = sharding.state_shardings(
        jax.eval_shape(create, abstract_params), tx, params_sharding, mesh
    )
    batch_sharding = sharding.batch_sharding(mesh, rules)
    sharding.check_batch_size(config.train.batch_size, config.train.microbatches, batch_sharding)
    return _Placement(mesh, rules, params_sharding, state_sharding, batch_sharding)


# Under scan, XLA's loop-invariant code motion hoists the conversion of each layer's weights
# (bf16 storage -> the f32 its CPU dots compute in) out of the layer loop, which makes an
# f32 copy of *every* layer's weights at once: 0.11 of the 0.45 GiB of temp memory per device
# of a 0.47B fsdp=8 step (tools/preflight.py). Converting a layer at a time inside the loop
# costs the same conversions.
SCANNED_STEP_OPTIONS = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}


def _compiler_options(config: ml_collections.ConfigDict) -> dict[str, str] | None:
    return SCANNED_STEP_OPTIONS if config.model.scan_layers else None


def _jit_steps(config, objective, groups, tx, lr_fn, placement: _Placement):
    """The train step (state donated) and eval step, jitted with explicit shardings."""
    train_fn = functools.partial(
        steps.train_step,
        objective=objective,
        tx=tx,
        lr_fn=lr_fn,
        trainable=groups.trainable,
        microbatches=config.train.microbatches,
        skip_nonfinite=config.train.nonfinite == "skip",
    )
    eval_fn = functools.partial(steps.eval_step, objective=objective)
    replicated = sharding.replicated(placement.mesh)
    train_step = jax.jit(
        train_fn,
        in_shardings=(placement.state, placement.batch),
        out_shardings=(placement.state, replicated),
        donate_argnums=(0,),
        compiler_options=_compiler_options(config),
    )
    eval_step = jax.jit(
        eval_fn,
        in_shardings=(placement.params, placement.batch),
        out_shardings=replicated,
        compiler_options=_compiler_options(config),
    )
    bind = functools.partial(sharding.MeshBound, mesh=placement.mesh, logical_rules=placement.rules)
    return bind(train_step), bind(eval_step)


def _jit_predict_step(config, kind, module, placement: _Placement):
    """Logits and the features the head reads (`steps.predict_step`), for kinds that predict
    with their head; None for generative ones (predict generates with `evaluation/lm_generation.py`)."""
    if not kind.predicts_with_head:
        return None
    jitted = jax.jit(
        functools.partial(steps.predict_step, apply_fn=module.apply),
        in_shardings=(placement.params, placement.batch),
        out_shardings=sharding.replicated(placement.mesh),
        compiler_options=_compiler_options(config),
    )
    return sharding.MeshBound(jitted, placement.mesh, placement.rules)


def objective_for(config: ml_collections.ConfigDict, kind, task, module) -> steps.Objective:
    """The step's objective, chosen here so the jitted steps hold no branch on the config.

    Kinds scored per token (causal LMs, speech decoders) with `model.lm_loss_chunk` > 0 take
    the chunked loss: the
    module returns its hidden state (`return_hidden=True`) and `logits_from_hidden` applies
    its head per chunk. Both train on next-token `labels` weighted per token.
    """
    chunk = config.model.lm_loss_chunk
    if kind.per_token and chunk > 0:
        return functools.partial(
            steps.chunked_lm_objective,
            hidden_fn=functools.partial(module.apply, return_hidden=True),
            head_fn=functools.partial(module.apply, method="logits_from_hidden"),
            chunk=chunk,
        )
    return functools.partial(steps.logits_objective, apply_fn=module.apply, loss_fn=kind.loss(task))


HEAD_BIAS_INITS = ("zeros", "prior")
MODEL_INITS = ("pretrained", "random")


def _check_task_options(config: ml_collections.ConfigDict, kind, task) -> None:
    """The config keys whose valid values depend on the task, checked before any loading."""
    check_data_keys(config, kind, config_lib.base_config().data)
    names = kind.metric_names(task)
    if config.train.metric and config.train.metric not in names:
        raise ValueError(
            f"train.metric={config.train.metric!r} is not reported by task {task.name!r}; "
            f"choose one of {names} ('' = {task.main_metric!r})"
        )
    chunk = config.model.lm_loss_chunk
    if not isinstance(chunk, int) or chunk < 0:
        raise ValueError(f"model.lm_loss_chunk={chunk!r}: expected an int >= 0 (0 = full logits)")
    choice = config.model.head_bias_init
    if choice not in HEAD_BIAS_INITS:
        raise ValueError(f"model.head_bias_init={choice!r}: expected one of {HEAD_BIAS_INITS}")
    if config.model.init not in MODEL_INITS:
        raise ValueError(
            f"model.init={config.model.init!r}: expected 'pretrained' (the checkpoint's "
            "weights) or 'random' (every param from the init, with the run's seed)"
        )
    kind.check_options(config, task)


def _dropout_overrides(config: ml_collections.ConfigDict, family: ModelFamily) -> dict[str, Any]:
    """`model.dropout` (>= 0) as the family's dropout fields; {} keeps the pretrained ones."""
    rate = config.model.dropout
    if rate < 0:
        return {}
    if not family.dropout_keys:
        raise ValueError(
            f"model.dropout={rate}: model family {family.name!r} trains without dropout "
            "(LoRA has its own: peft.dropout); leave model.dropout at -1"
        )
    return {key: rate for key in family.dropout_keys}


def _head_bias_override(config, family: ModelFamily, abstract_params, data) -> dict[str, Any]:
    """{head bias path: the train labels' prior} for `model.head_bias_init=prior`, else {}."""
    if config.model.head_bias_init != "prior" or data is None:
        return {}
    prior = data.label_prior()
    bias = tree_paths.get_path(abstract_params, family.head_bias)
    if bias.shape != prior.shape:
        raise ValueError(
            f"model.head_bias_init='prior': param {family.head_bias!r} has shape "
            f"{bias.shape} but task {data.task.name!r} has {prior.shape[0]} label(s)"
        )
    return {family.head_bias: prior.astype(bias.dtype)}


def _resolve_model(name: str) -> str:
    """A GGUF file or an HF directory for `model.name` (path, packaged alias or hub id)."""
    if model_files.is_gguf(name):
        return str(model_files.resolve_gguf(name))
    return str(model_files.resolve_model_dir(name))
