"""Build the pieces of a run from its config: task, tokenizer, model, optimizer, mesh, steps.

`train`, `eval`, `export` and the tools all start here, so they can never disagree about
how a config maps to a model, an optimizer or a sharding.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
import optax

from finetune_jax import tree_paths
from finetune_jax.cluster import sharding
from finetune_jax.data import loaders, tasks
from finetune_jax.evaluation.metrics import eval_metric_names, metric_mode
from finetune_jax.hf import loading, model_files
from finetune_jax.models import family_for
from finetune_jax.models import lora as lora_lib
from finetune_jax.models.family import ModelFamily
from finetune_jax.training import checkpoints, optim, steps
from finetune_jax.training.losses import loss_for
from finetune_jax.training.state import TrainState, create_train_state


@dataclasses.dataclass
class Setup:
    """Everything a train or eval loop needs, built once from the config."""

    config: ml_collections.ConfigDict
    task: tasks.Task | tasks.ChatTask
    data: loaders.ClassificationData | loaders.ChatData
    tokenizer: Any
    model_ref: str  # the resolved model: an HF directory or a GGUF file
    hf_config: dict[str, Any]  # the pretrained model's HF config (export starts from it)
    family: ModelFamily  # the model's family (registry entry)
    model_config: Any  # BertConfig / LlamaConfig
    module: Any  # the flax module
    params: Any  # pretrained params (host), unboxed
    groups: optim.ParamGroups
    tx: optax.GradientTransformation
    lr_fn: optax.Schedule
    mesh: jax.sharding.Mesh
    state_sharding: Any
    batch_sharding: jax.sharding.NamedSharding
    train_step: Callable  # jitted (state, batch) -> (state, metrics), state donated
    eval_step: Callable  # jitted (params, batch) -> outputs

    @property
    def trainable_paths(self) -> list[str]:
        """'/'-joined paths of the trainable leaves, in the order the step's grads use."""
        paths = tree_paths.param_paths(self.params)
        return [p for p, t in zip(paths, jax.tree.leaves(self.groups.trainable)) if t]

    @property
    def metric(self) -> str:
        return self.config.train.metric or self.task.main_metric

    def put_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """Host batch (this process's rows) -> global arrays sharded over the data axes."""
        return {
            k: jax.make_array_from_process_local_data(self.batch_sharding, v)
            for k, v in batch.items()
        }

    def initial_state(self) -> TrainState:
        """A fresh state around the pretrained params, placed on the mesh."""
        return jax.device_put(
            create_train_state(self.params, self.tx, self.config.seed), self.state_sharding
        )

    def pretrained_params(self) -> Any:
        """The pretrained params placed on the mesh (no optimizer state built for them)."""
        return jax.device_put(self.params, self.state_sharding.params)

    def restore_params(self, workdir: str, which: str = "best") -> tuple[int, Any]:
        """(step, params) of a finished checkpoint of `workdir`: 'best' (by the run's
        metric), 'latest' or a step number; the manager is opened read-only."""
        manager = checkpoints.make_manager(
            workdir,
            self.config.train.keep_checkpoints,
            self.metric,
            metric_mode(self.metric),
            async_save=False,
            read_only=True,
        )
        try:
            step = checkpoints.pick_step(manager, which)
            return step, checkpoints.restore(manager, step, self.abstract_state())[0].params
        finally:
            checkpoints.close(manager)

    def abstract_state(self) -> TrainState:
        """Shapes, dtypes and shardings of the state, for restoring without materialising it."""
        shapes = jax.eval_shape(lambda: create_train_state(self.params, self.tx, self.config.seed))
        return checkpoints.abstract_with_shardings(shapes, self.state_sharding)


def lora_config(config: ml_collections.ConfigDict) -> lora_lib.LoraConfig | None:
    """`config.peft` as a LoraConfig (None when off), checked against `config.optim`.

    LoRA under a preset that trains the base weights (`full`, `llrd`, ...) would silently be
    full fine-tuning plus an adapter, so only `lora` or explicit `rules` are accepted.
    """
    lora = lora_lib.LoraConfig.from_config(config.peft)
    preset = config.optim.preset
    if lora is not None and preset not in ("lora", "rules"):
        raise ValueError(
            f"peft.rank={lora.rank} (LoRA) with optim.preset={preset!r} would train the base "
            "weights too; set optim.preset=lora (LoRA params + head trainable, rest frozen) "
            "or write explicit optim.rules with optim.preset=rules"
        )
    if lora is None and preset == "lora":
        raise ValueError("optim.preset=lora needs LoRA params: set peft.rank > 0")
    return lora


def build(config: ml_collections.ConfigDict, devices: list[jax.Device] | None = None) -> Setup:
    """Resolve the model and task, load pretrained weights, and jit the steps.

    `devices` (default: all devices of all processes) is what `config.mesh` is laid over.
    """
    lora = lora_config(config)  # fail before any loading
    task = tasks.get_task(config.data.task)
    _check_task_options(config, task)
    model_ref = _resolve_model(config.model.name)
    hf_config = model_files.read_config(model_ref)
    family = family_for(hf_config.get("model_type", ""))
    model_config, module, params = loading.load_pretrained(
        family,
        model_ref,
        task.kind,
        seed=config.seed,
        dtype=config.model.dtype,
        remat=config.model.remat,
        scan_layers=config.model.scan_layers,
        lora=lora,
        **_task_overrides(config, task),
    )
    params = jax.tree.map(np.asarray, params)
    tokenizer = model_files.load_tokenizer(model_ref)
    data = loaders.make_loader(config, task, tokenizer)
    if config.model.head_bias_init == "prior":
        params = with_prior_head_bias(params, family, data)
    groups = optim.param_groups(config.optim, params, family.layer_stacks(model_config))
    tx, lr_fn = optim.make_optimizer(config.optim, groups, config.train.max_steps)
    placement = _placement(config, devices, family, model_config, params, tx)
    train_step, eval_step = _jit_steps(config, task, module, groups, tx, lr_fn, placement)
    return Setup(
        config=config,
        task=task,
        data=data,
        tokenizer=tokenizer,
        model_ref=model_ref,
        hf_config=hf_config,
        family=family,
        model_config=model_config,
        module=module,
        params=params,
        groups=groups,
        tx=tx,
        lr_fn=lr_fn,
        mesh=placement.mesh,
        state_sharding=placement.state,
        batch_sharding=placement.batch,
        train_step=train_step,
        eval_step=eval_step,
    )


@dataclasses.dataclass(frozen=True)
class _Placement:
    mesh: jax.sharding.Mesh
    rules: list[tuple[str, Any]]
    params: Any
    state: Any
    batch: jax.sharding.NamedSharding


def _placement(config, devices, family, model_config, params, tx) -> _Placement:
    """The mesh and the shardings of params, state and batches, from the config's rules."""
    mesh = sharding.make_mesh(config.mesh, devices)
    rules = sharding.logical_rules(config)
    boxed = jax.eval_shape(lambda: family.init_params(model_config, jax.random.key(0)))
    params_sharding = sharding.param_shardings(boxed, mesh, rules)
    shapes = jax.eval_shape(lambda: create_train_state(params, tx, config.seed))
    state_sharding = sharding.state_shardings(shapes, tx, params_sharding, mesh)
    batch_sharding = sharding.batch_sharding(mesh, rules)
    sharding.check_batch_size(config.train.batch_size, config.train.microbatches, batch_sharding)
    return _Placement(mesh, rules, params_sharding, state_sharding, batch_sharding)


def _jit_steps(config, task, module, groups, tx, lr_fn, placement: _Placement):
    """The train step (state donated) and eval step, jitted with explicit shardings."""
    loss_fn = loss_for(task)
    train_fn = functools.partial(
        steps.train_step,
        apply_fn=module.apply,
        tx=tx,
        loss_fn=loss_fn,
        lr_fn=lr_fn,
        trainable=groups.trainable,
        microbatches=config.train.microbatches,
        skip_nonfinite=config.train.nonfinite == "skip",
    )
    eval_fn = functools.partial(steps.eval_step, apply_fn=module.apply, loss_fn=loss_fn)
    replicated = sharding.replicated(placement.mesh)
    train_step = jax.jit(
        train_fn,
        in_shardings=(placement.state, placement.batch),
        out_shardings=(placement.state, replicated),
        donate_argnums=(0,),
    )
    eval_step = jax.jit(
        eval_fn, in_shardings=(placement.params, placement.batch), out_shardings=replicated
    )
    bind = functools.partial(sharding.MeshBound, mesh=placement.mesh, logical_rules=placement.rules)
    return bind(train_step), bind(eval_step)


HEAD_BIAS_INITS = ("zeros", "prior")


def _check_task_options(config: ml_collections.ConfigDict, task) -> None:
    """The config keys whose valid values depend on the task, checked before any loading."""
    names = eval_metric_names(task)
    if config.train.metric and config.train.metric not in names:
        raise ValueError(
            f"train.metric={config.train.metric!r} is not reported by task {task.name!r}; "
            f"choose one of {names} ('' = {task.main_metric!r})"
        )
    choice = config.model.head_bias_init
    if choice not in HEAD_BIAS_INITS:
        raise ValueError(f"model.head_bias_init={choice!r}: expected one of {HEAD_BIAS_INITS}")
    if choice == "prior" and task.kind == "causal_lm":
        raise ValueError(
            f"model.head_bias_init='prior' sets a new classification head's bias; "
            f"data.task={config.data.task!r} trains the pretrained LM head: use 'zeros'"
        )


def with_prior_head_bias(params: dict[str, Any], family: ModelFamily, data) -> dict[str, Any]:
    """`params` with the new head's bias set to the train labels' prior (see config.py)."""
    prior = data.label_prior()
    bias = tree_paths.get_path(params, family.head_bias)
    if bias.shape != prior.shape:
        raise ValueError(
            f"model.head_bias_init='prior': param {family.head_bias!r} has shape "
            f"{bias.shape} but task {data.task.name!r} has {prior.shape[0]} label(s)"
        )
    tree_paths.set_path(params, family.head_bias, prior.astype(bias.dtype))
    return params


def _resolve_model(name: str) -> str:
    """A GGUF file or an HF directory for `model.name` (path, packaged alias or hub id)."""
    if model_files.is_gguf(name):
        return str(model_files.resolve_gguf(name))
    return str(model_files.resolve_model_dir(name))


def _task_overrides(config: ml_collections.ConfigDict, task) -> dict[str, Any]:
    """Model-config overrides the task implies: a classifier's width and dropout."""
    if task.kind == "causal_lm":
        if config.model.dropout >= 0:
            raise ValueError(
                "model.dropout is for encoder classifiers; causal LMs here train without "
                "dropout (LoRA has its own: peft.dropout)"
            )
        return {}
    overrides: dict[str, Any] = {"num_labels": task.num_labels}
    if config.model.dropout >= 0:
        overrides["hidden_dropout_prob"] = config.model.dropout
        overrides["attention_probs_dropout_prob"] = config.model.dropout
    return overrides
