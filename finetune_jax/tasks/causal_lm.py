"""Causal-LM SFT kind: chat records rendered with the tokenizer's chat template, next-token
loss on the assistant's tokens; evals add sample generations (GSM8K: exact match of the
final answer) and predict writes completions."""

from __future__ import annotations

import dataclasses
from typing import Any

from finetune_jax.data import chat_loader
from finetune_jax.evaluation import lm_samples, prediction
from finetune_jax.hf import saving
from finetune_jax.tasks import losses
from finetune_jax.tasks.kind import TaskKind


@dataclasses.dataclass(frozen=True)
class ChatTask:
    """Supervised fine-tuning of a causal LM on chat records (see `data/chat_sources.py`).

    Attributes:
      name: registry key.
      format: record format for `chat_sources.load_records` ("auto" detects it).
      answer_marker: for GSM8K-style answers, the marker before the final answer
        ("#### 42"); the eval script then scores generations by exact match of that answer.
    """

    name: str
    format: str
    answer_marker: str | None = None
    kind = "causal_lm"
    metrics = ("token_accuracy",)
    main_metric = "loss"  # held-out loss per trained token; lower is better
    label_names = None  # a causal LM has no class head
    quote_none = False  # predict reads .tsv rows as ordinary quoted TSV


CHAT_TASKS: dict[str, ChatTask] = {
    "chat": ChatTask(name="chat", format="auto"),
    "gsm8k": ChatTask(name="gsm8k", format="gsm8k", answer_marker="####"),
    "alpaca": ChatTask(name="alpaca", format="alpaca"),
    "messages": ChatTask(name="messages", format="messages"),
}


class CausalLM(TaskKind):
    """Packed chat rows (see `data/chat_loader.py`); the pretrained LM head trains."""

    name = "causal_lm"
    tasks = CHAT_TASKS
    per_token = True
    eval_count = "tokens"  # the trained (assistant) target tokens
    eval_records = "generations"
    data_keys = frozenset({"max_length", "packing"})

    def loader(self, config, task, preprocessor, model_ref, saved_names=None):
        return chat_loader.ChatData(config, task, preprocessor)

    def batch_spec(self, config, task):
        return chat_loader.ChatData.batch_spec(config, task)

    def loss(self, task):
        return losses.next_token_loss

    def eval_samples(self, setup, params, split_data) -> tuple[list[dict], dict[str, Any]]:
        """Generations for the first `generate.num_samples` records of the split."""
        settings = setup.config.generate
        if settings.num_samples <= 0:
            return [], {}
        samples = lm_samples.generate_samples(
            setup.module,
            params,
            setup.tokenizer,
            setup.hf_config,
            split_data.conversations[: settings.num_samples],
            settings,
            setup.task.answer_marker,
        )
        return samples, lm_samples.summarize(samples)

    def predictor(self, setup, params, source, threshold, files=None):
        return prediction.CompletionPredictor(setup, params, source)

    def export_generation(self, setup) -> dict[str, Any]:
        return saving.generation_config(setup.tokenizer, setup.hf_config)


KIND = CausalLM()
