"""The task-kind interface: what one kind of task (text classification, causal-LM SFT, image
classification, speech recognition, token classification, translation) says about its tasks, so the
builder, loop, eval, predict, export and monitor ask the kind instead of branching on its
name. A kind is one module of this package plus one line in `tasks/__init__.py`'s registry;
each model family maps the kinds it supports to heads (`models/family.py`'s `HeadSpec`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import ml_collections

from finetune_jax.hf import model_files

# config.data keys every kind reads: where the data is, its splits and subsets.
COMMON_DATA_KEYS = frozenset(
    {
        "task",
        "dir",
        "files",
        "eval_split",
        "holdout_rows",
        "max_train_rows",
        "max_eval_rows",
        "split_seed",
        "stratify",
    }
)


class TaskKind:
    """One task kind. Subclasses override what differs; the defaults say "not for this kind".

    Class attributes:
      name: the kind's name, the key of family heads (`family.heads[kind.name]`).
      tasks: `data.task` value -> the registered task of this kind (presets and generic ones).
      per_token: scored per target token (a decoder's next-token loss): evals report
        perplexity, and `model.lm_loss_chunk` applies.
      predicts_with_head: predict and monitor run the jitted `predict_step` (logits and the
        features the head reads) on this kind's batches.
      data_keys: the `config.data` keys this kind reads besides COMMON_DATA_KEYS; a key set
        for a kind that does not read it is an error (`check_data_keys`).
      eval_records: name of the per-example file eval writes (`<name>_<split>_<tag>.jsonl`:
        generations, transcripts, entities), "" for none.
      monitors: the drift monitor watches this kind's predictions (`monitor.py`).
      label_prior: its loader's `label_prior()` may start a new head's bias
        (`model.head_bias_init=prior`).
      beam_search: its evals generate with `generate.num_beams`.
      eval_count: the key under which an eval reports what it scored (its loss weights
        summed): "examples" (rows), or "tokens" for kinds scored per token.
    """

    name: str = ""
    tasks: Mapping[str, Any] = {}
    per_token: bool = False
    predicts_with_head: bool = False
    data_keys: frozenset[str] = frozenset()
    eval_records: str = ""
    monitors: bool = False
    label_prior: bool = False
    beam_search: bool = False
    eval_count: str = "examples"

    # -- resolving the task -------------------------------------------------------------
    def configured(self, data: ml_collections.ConfigDict) -> Any:
        """The task `data.task` names, with the `data.*` keys this kind reads applied."""
        return self.tasks[data.task]

    def resolve(self, config: ml_collections.ConfigDict, task: Any, saved_names=None) -> Any:
        """`task` with everything the model needs known (class names), without a model."""
        return task

    def check_options(self, config: ml_collections.ConfigDict, task: Any) -> None:
        """Config values that are wrong for this kind, checked before anything loads."""
        if config.model.head_bias_init == "prior" and not self.label_prior:
            raise ValueError(
                f"model.head_bias_init='prior' starts a new classification head's bias at "
                f"the train labels' prior; data.task={config.data.task!r} ({self.name}) has "
                "no such head and prior: use 'zeros'"
            )
        if config.generate.num_beams != 1 and not self.beam_search:
            raise ValueError(
                f"generate.num_beams={config.generate.num_beams!r}: beam search is for the "
                f"encoder-decoder kinds (speech recognition, translation); data.task="
                f"{config.data.task!r} ({self.name}) does not use it: leave num_beams at 1"
            )

    def model_overrides(self, config: ml_collections.ConfigDict, task: Any) -> dict[str, Any]:
        """Model-config fields the task sets (a new head's width)."""
        return {}

    # -- data -----------------------------------------------------------------------------
    def preprocessor(self, config: ml_collections.ConfigDict, model_ref: str) -> Any:
        """What turns raw examples into model inputs (a tokenizer by default)."""
        return model_files.load_tokenizer(model_ref)

    def loader(self, config, task, preprocessor, model_ref: str, saved_names=None) -> Any:
        """The data object the loop reads: `.task`, `.load(split)`, `.train_batches()`,
        `.eval_batches(split)` and `.eval_batch_count(split)` (how many it yields, for the
        eval's progress; see `training/steps.py` for the batch contract)."""
        raise NotImplementedError(self.name)

    def batch_spec(self, config: ml_collections.ConfigDict, task: Any) -> dict[str, tuple]:
        """{name: (shape, dtype)} of the largest global batch; reads no data (preflight)."""
        raise NotImplementedError(self.name)

    # -- scoring --------------------------------------------------------------------------
    def loss(self, task: Any) -> Callable:
        """(outputs, labels, weights) -> (loss sum, predictions), for the jitted steps."""
        raise NotImplementedError(self.name)

    def metric_names(self, task: Any) -> tuple[str, ...]:
        """Every name an eval of `task` reports (any may be `train.metric`)."""
        extra = ("perplexity",) if self.per_token else ()
        return ("loss", *extra, *task.metrics)

    def evaluator(self, config, module, data, tokenizer) -> Any:
        """What an eval does besides the teacher-forced step (speech: transcription), or None."""
        return None

    def eval_samples(self, setup, params, split_data) -> tuple[list[dict], dict[str, Any]]:
        """(per-example records, summary metrics) the eval script adds (generations)."""
        return [], {}

    # -- after training -------------------------------------------------------------------
    def predictor(self, setup, params, source: str, threshold: float, files=None) -> Callable:
        """rows -> one dict of output columns per row, for the predict script; `files`
        (`prediction_io.FileOutputs`) says where a kind that writes files per input (masks,
        pictures) puts them, and whether it draws pictures for a person."""
        raise ValueError(f"predict does not support {self.name} tasks")

    def export_config(self, task: Any) -> dict[str, Any]:
        """Keys the exported config.json takes from the task (labels)."""
        return {}

    def export_generation(self, setup) -> dict[str, Any] | None:
        """The exported generation_config.json, or None."""
        return None

    def export_files(self, setup) -> tuple[str, ...]:
        """Files of the model directory that travel with an export (feature extractor)."""
        return ()

    def check_monitorable(self, setup) -> None:
        """Refuses, in one line, a kind the drift monitor cannot watch."""
        if not self.monitors:
            raise ValueError(
                f"monitor watches classifiers and regressors (text or image); data.task="
                f"{setup.config.data.task!r} is a {self.name} task"
            )

    def monitor_reference(self, setup, reference: str, rows: int):
        """Chunks of a split's rows (by split name) for the drift monitor."""
        raise ValueError(f"--reference={reference!r}: pass a file of rows")


def check_data_keys(config: ml_collections.ConfigDict, kind: TaskKind, defaults) -> None:
    """A `config.data` key set away from its default that `kind` does not read is an error
    naming the key (it would be silently ignored). `defaults` is `config.base_config().data`."""
    read = COMMON_DATA_KEYS | kind.data_keys
    unread = [k for k in config.data if k not in read and config.data[k] != defaults[k]]
    if unread:
        raise ValueError(
            f"data.{unread[0]}={config.data[unread[0]]!r} is not read by {kind.name} tasks "
            f"(data.task={config.data.task!r}); remove it. {kind.name} reads data."
            + ", data.".join(sorted(read))
        )
