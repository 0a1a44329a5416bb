"""`Setup`: everything a train, eval or export run needs, built once from the config
(see builder.py), and the ways to get params and state into the mesh: streamed from the
pretrained checkpoint, born sharded, or restored from a run's checkpoints.

A run with frozen params saves slim checkpoints (`train.checkpoint_frozen=False`): only
what trains, its optimizer state and the progress. Restoring one streams the frozen params
from `model.name` again, checks them against the checkpoint's record (`frozen_base.py`)
before anything is restored, and puts the checkpointed params over them."""

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
from finetune_jax.evaluation import evaluator
from finetune_jax.evaluation.metrics import metric_mode
from finetune_jax.hf import loading
from finetune_jax.models import lora as lora_lib
from finetune_jax.models.family import ModelFamily
from finetune_jax.tasks.kind import TaskKind
from finetune_jax.training import checkpoints, frozen_base, optim
from finetune_jax.training.state import TrainState, create_train_state


@dataclasses.dataclass
class Setup:
    """Everything a train or eval loop needs, built once from the config."""

    config: ml_collections.ConfigDict  # with the family's defaults for 'auto' values
    kind: TaskKind  # the task's kind: what the loop, eval, predict, export ask
    task: Any  # the kind's task, class names resolved
    data: Any  # the kind's loader (None in an abstract build)
    tokenizer: Any  # the tokenizer, or an image task's image processor
    model_ref: str  # the resolved model: an HF directory or a GGUF file ("" if abstract)
    hf_config: dict[str, Any]  # the pretrained model's HF config (export starts from it)
    family: ModelFamily  # the model's family (registry entry)
    model_config: Any  # BertConfig / LlamaConfig / WhisperConfig / ...
    module: Any  # the flax module
    # Shapes, dtypes and shardings of the params (jax.ShapeDtypeStruct): no values are held;
    # `pretrained_params` streams them from the checkpoint when a run needs them.
    abstract_params: Any
    param_overrides: dict[str, np.ndarray]  # host values replacing loaded ones (head prior)
    groups: optim.ParamGroups
    tx: optax.GradientTransformation
    lr_fn: optax.Schedule
    mesh: jax.sharding.Mesh
    state_sharding: Any
    batch_sharding: jax.sharding.NamedSharding
    train_step: Callable  # jitted (state, batch) -> (state, metrics), state donated
    eval_step: Callable  # jitted (params, batch) -> outputs
    # Kinds that predict with their head: jitted (params, batch) -> {logits, features}
    # (steps.predict_step).
    predict_step: Callable | None = None
    # What every eval adds (speech: transcripts and WER / CER; NER: entity F1), or None;
    # see `evaluation/evaluator.py`.
    scorer: Any = None

    @property
    def trainable_paths(self) -> list[str]:
        """'/'-joined paths of the trainable leaves, in the order the step's grads use."""
        return self._paths_where(trainable=True)

    @property
    def frozen_paths(self) -> list[str]:
        """'/'-joined paths of the frozen leaves (a stacked leaf frozen in some of its
        layers only trains, so it is not among them)."""
        return self._paths_where(trainable=False)

    def _paths_where(self, trainable: bool) -> list[str]:
        paths = tree_paths.param_paths(self.abstract_params)
        flags = jax.tree.leaves(self.groups.trainable)
        return [p for p, t in zip(paths, flags) if t == trainable]

    def frozen_record(self, params: Any, checked: dict | None = None) -> dict[str, Any] | None:
        """The record a slim checkpoint saves of the frozen leaves of `params` (this run's,
        as loaded or restored); None when checkpoints hold every param: nothing is frozen,
        or `train.checkpoint_frozen` keeps the frozen ones in them. `checked`: the record of
        the slim checkpoint `params` were restored from, whose frozen leaves `frozen_params`
        has just checked against it: reused (with this run's source) rather than computing
        every checksum again."""
        if self.config.train.checkpoint_frozen or not self.frozen_paths:
            return None
        if checked is not None and set(checked["leaves"]) == set(self.frozen_paths):
            return {**checked, "source": self.model_ref}
        flat = lora_lib.flat_paths(params)
        return frozen_base.record(self.model_ref, {p: flat[p] for p in self.frozen_paths})

    @property
    def metric(self) -> str:
        return self.config.train.metric or self.task.main_metric

    def evaluate(self, params: Any, split: Any, records: list | None = None) -> dict[str, Any]:
        """Loss, the task's metrics and the scorer's on a loaded split (`data.load(...)`);
        the scorer's per-example records go to `records` when given."""
        batches = self.data.eval_batches(split)
        return evaluator.evaluate(
            self.eval_step,
            params,
            batches,
            self.task,
            self.put_batch,
            scorer=self.scorer,
            records=records,
            per_token=self.kind.per_token,
            count_key=self.kind.eval_count,
            total=self.data.eval_batch_count(split),
        )

    def put_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """Host batch (this process's rows) -> global arrays sharded over the data axes."""
        return {
            k: jax.make_array_from_process_local_data(self.batch_sharding, v)
            for k, v in batch.items()
        }

    def initial_state(self) -> TrainState:
        """A fresh state around the pretrained params, born sharded: the optimizer state is
        created inside jit with the state's shardings, the params' buffers donated to it."""
        create = functools.partial(create_train_state, tx=self.tx, seed=self.config.seed)
        init = jax.jit(create, out_shardings=self.state_sharding, donate_argnums=0)
        return init(self.pretrained_params())

    def pretrained_params(self, only: list[str] | None = None) -> Any:
        """The pretrained params streamed from the checkpoint into their shardings (with
        `model.init=random`, every param from the family's init instead); `only` those
        at these paths when given."""
        shardings = {
            path: leaf.sharding for path, leaf in lora_lib.flat_paths(self.abstract_params).items()
        }
        return loading.load_params(
            self.family,
            self.model_config,
            self.model_ref,
            shardings,
            self.config.seed,
            replace=self.param_overrides,
            random_init=self.config.model.init == "random",
            only=only,
        )

    def restore_latest(self, manager: Any) -> tuple[TrainState, dict[str, Any]] | None:
        """(state, progress) of the latest finished checkpoint, or None if there is none."""
        step = manager.latest_step()
        if step is None:
            return None
        frozen = self.frozen_params(manager, step)
        return checkpoints.restore(manager, step, self.abstract_state(), frozen)

    def checkpoint_params(
        self, manager: Any, step: int, live_params: Any = None, live_record: dict | None = None
    ) -> Any:
        """The params saved at `step`, without the optimizer state. A slim checkpoint whose
        record has the digest of `live_record` (this run's, of `live_params`) takes those
        params' frozen leaves instead of streaming them again."""
        record = checkpoints.frozen_record(manager, step)
        if record is not None and live_record and live_record["digest"] == record["digest"]:
            flat = lora_lib.flat_paths(live_params)
            frozen = {path: flat[path] for path in record["leaves"]}
        else:
            frozen = self.frozen_params(manager, step)
        return checkpoints.restore_params(manager, step, self.abstract_params, frozen)

    def frozen_params(self, manager: Any, step: int) -> dict[str, jax.Array] | None:
        """The frozen params a slim checkpoint at `step` lacks, streamed from `model.name`
        and checked against its record (a SourceChangedError naming both digests if they
        changed) before anything is restored; None for a full checkpoint."""
        record = checkpoints.frozen_record(manager, step)
        if record is None:
            return None
        checkpoints.check_compatible(manager, step, self.abstract_params, record)
        where = f"checkpoint step {step} in {manager.directory}"
        try:
            values = lora_lib.flat_paths(self.pretrained_params(only=list(record["leaves"])))
        except FileNotFoundError as e:
            raise checkpoints.CheckpointError(
                f"{where} holds only the trained params; its frozen ones come from "
                f"{record['source']}, and {self.model_ref} cannot be read: {e}. Restore the "
                "weights there, or point model.name at a copy of them"
            ) from e
        frozen_base.check_source(record, values, self.model_ref, where)
        return values

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
            return step, self.checkpoint_params(manager, step)
        finally:
            checkpoints.close(manager)

    def abstract_state(self) -> TrainState:
        """Shapes, dtypes and shardings of the state, for restoring without materialising it."""
        create = functools.partial(create_train_state, tx=self.tx, seed=self.config.seed)
        shapes = jax.eval_shape(create, self.abstract_params)
        return checkpoints.abstract_with_shardings(shapes, self.state_sharding)
