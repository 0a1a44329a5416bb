"""Generation-based evaluation of a causal LM on chat records: sample generations for the
held-out prompts, and for GSM8K-style answers the exact match of the final answer."""

from __future__ import annotations

import decimal
import re
from collections.abc import Sequence
from typing import Any

import ml_collections

from finetune_jax.data.chat_batches import Conversation, pad_token_id
from finetune_jax.evaluation.lm_generation import Generator, SamplingConfig

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_answer(text: str, marker: str = "####") -> str | None:
    """The number after the last `marker` ("#### 1,234." -> "1234"), or None if absent."""
    if marker not in text:
        return None
    match = _NUMBER.search(text.rsplit(marker, 1)[1])
    if match is None:
        return None
    # Canonical decimal text, so "5.50", "5.5" and "5.500" compare equal (and "12.0", "12").
    value = decimal.Decimal(match.group().replace(",", "")).normalize()
    return format(value, "f")


def split_prompt(conversation: Conversation) -> tuple[Conversation, str]:
    """(messages before the last assistant turn, that turn's content): prompt and reference."""
    last = max((i for i, m in enumerate(conversation) if m["role"] == "assistant"), default=None)
    if last is None:
        raise ValueError(
            f"conversation has no assistant turn to compare with: {conversation!r:.120}"
        )
    return conversation[:last], conversation[last]["content"]


def eos_ids(tokenizer, hf_config: dict[str, Any]) -> tuple[int, ...]:
    """Token ids that end a generation: the tokenizer's eos and the model config's."""
    ids = {tokenizer.eos_token_id}
    configured = hf_config.get("eos_token_id")
    ids.update(configured if isinstance(configured, list) else [configured])
    return tuple(sorted(i for i in ids if i is not None))


def prompt_token_ids(tokenizer, prompts: Sequence[Conversation]) -> list[list[int]]:
    """Each prompt rendered with the chat template (plus the generation prompt), then
    tokenized without added specials, exactly as `sft` encodes training data."""
    texts = [
        tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False)
        for p in prompts
    ]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def make_generator(
    module: Any,
    tokenizer,
    hf_config: dict[str, Any],
    settings: ml_collections.ConfigDict,
    buckets: Sequence[int],
) -> Generator:
    """A `Generator` with the run's `generate.*` sampling settings and the model's EOS ids."""
    sampling = SamplingConfig(
        max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature,
        top_k=settings.top_k,
        seed=settings.seed,
    )
    return Generator(
        module, eos_ids(tokenizer, hf_config), pad_token_id(tokenizer), sampling, buckets
    )


def generate_samples(
    module: Any,
    params: Any,
    tokenizer,
    hf_config: dict[str, Any],
    conversations: Sequence[Conversation],
    settings: ml_collections.ConfigDict,
    answer_marker: str | None = None,
) -> list[dict[str, Any]]:
    """Generates a reply to each conversation's last prompt; one record per conversation:
    prompt (rendered), reference, output, and with `answer_marker` the extracted answers and
    whether they match."""
    prompts, references = zip(*(split_prompt(c) for c in conversations))
    token_ids = prompt_token_ids(tokenizer, prompts)
    longest = max(len(t) for t in token_ids)
    buckets = sorted({64, 128, 256, 512, 1024, -(-longest // 64) * 64})
    generator = make_generator(module, tokenizer, hf_config, settings, buckets)
    outputs = generator.generate(params, token_ids, settings.batch_size)
    samples = []
    for ids, reference, output in zip(token_ids, references, outputs):
        record = {
            "prompt": tokenizer.decode(ids),
            "reference": reference,
            "output": tokenizer.decode(output, skip_special_tokens=True),
            "output_tokens": len(output),
        }
        if answer_marker is not None:
            record["answer"] = final_answer(reference, answer_marker)
            record["predicted"] = final_answer(record["output"], answer_marker)
            record["correct"] = record["predicted"] is not None and (
                record["predicted"] == record["answer"]
            )
        samples.append(record)
    return samples


def summarize(samples: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Aggregate generation metrics: exact match (when scored) and mean output length."""
    result = {
        "generations": len(samples),
        "mean_output_tokens": sum(s["output_tokens"] for s in samples) / max(len(samples), 1),
    }
    if samples and "correct" in samples[0]:
        result["exact_match"] = sum(s["correct"] for s in samples) / len(samples)
        result["answered"] = sum(s["predicted"] is not None for s in samples) / len(samples)
    return result
