"""Scratch memory of a causal LM's train step with full logits vs the chunked LM loss.

  python tools/lm_loss_memory.py                                   # LoRA (the config's default)
  python tools/lm_loss_memory.py --config.optim.preset=full --config.peft.rank=0
  python tools/lm_loss_memory.py --chunks=0,512,1024,2048

Builds `configs/sft/smollm2_gsm8k_lora.py` (SmolLM2-135M-Instruct, the packaged GGUF, vocabulary
49,152, tied head) with `data.max_length=2048` and `train.batch_size=8` once per value of
`model.lm_loss_chunk` in `--chunks` (0 = full [B, T, V] float32 logits; default: 0 and the
config default), lowers the jitted train step on abstract inputs (shapes, dtypes and the
builder's batch sharding; nothing runs) and prints XLA's `temp_size_in_bytes` of each compiled
step side by side, with each one's ratio to the first.

A second table isolates the loss: the LM head and cross-entropy alone, forward and backward
(gradients w.r.t. params and the hidden state [B, T, D]), from the same model. On a CPU the
train step's scratch is dominated by XLA's attention scores ([B, heads, T, T] float32 per
layer, 1.1 GiB each here), which hides the logits there; the second table shows them alone.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from finetune_jax import config as config_lib  # noqa: E402
from finetune_jax.cli import quiet_libraries  # noqa: E402
from finetune_jax.data import chat_batches, chat_loader  # noqa: E402
from finetune_jax.tasks import losses  # noqa: E402
from finetune_jax.training import builder, optim  # noqa: E402

DEFAULT_CHUNK = config_lib.base_config().model.lm_loss_chunk


def abstract_batch(exp: builder.Setup, batch_size: int, length: int) -> dict:
    """The SFT step's batch as shapes: keys and dtypes from the real row contract."""
    one = (np.ones(1, np.int32), np.ones(1, bool))
    row = chat_loader.step_batch(chat_batches.pack([one], length))
    return {
        k: jax.ShapeDtypeStruct((batch_size, length), v.dtype, sharding=exp.batch_sharding)
        for k, v in row.items()
    }


def step_memory(config, chunk: int, train_step: bool = True) -> dict:
    """Compile the train step with `model.lm_loss_chunk=chunk`; its memory figures."""
    config = config_lib.apply_overrides(
        config.copy_and_resolve_references(), {"model.lm_loss_chunk": chunk}, "--chunks"
    )
    exp = builder.build(config)
    batch = abstract_batch(exp, config.train.batch_size, config.data.max_length)
    temp = None
    if train_step:
        compiled = exp.train_step.lower(exp.abstract_state(), batch).compile()
        temp = compiled.memory_analysis().temp_size_in_bytes
    trainable, _ = optim.param_counts(exp.groups, exp.params)
    return {
        "chunk": chunk,
        "temp": temp,
        "vocab": exp.model_config.vocab_size,
        "trainable": trainable,
        "head_temp": head_loss_temp(exp, chunk, config.train.batch_size, config.data.max_length),
    }


def head_loss_temp(exp: builder.Setup, chunk: int, batch_size: int, length: int) -> int:
    """Scratch bytes of the LM head + loss alone, forward and backward, in either form."""
    head = functools.partial(exp.module.apply, method="logits_from_hidden")

    def loss(params, hidden, labels, weights):
        if chunk == 0:
            return losses.next_token_loss(head({"params": params}, hidden), labels, weights)[0]
        head_fn = lambda h, _: head({"params": params}, h)
        return losses.chunked_next_token_loss(hidden, labels, weights, head_fn, chunk)[0]

    shapes = jax.eval_shape(lambda: exp.params)
    tokens = (batch_size, length)
    hidden = jax.ShapeDtypeStruct((*tokens, exp.model_config.hidden_size), np.float32)
    args = (shapes, hidden, jax.ShapeDtypeStruct(tokens, np.int32))
    args += (jax.ShapeDtypeStruct(tokens, np.float32),)
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def _table(title: str, temps: list[tuple[int, int]]) -> list[str]:
    lines = [f"{title:<34}{'temp bytes':>18}{'GiB':>9}{'ratio':>8}"]
    for chunk, temp in temps:
        label = f"  model.lm_loss_chunk={chunk}" + (" (full)" if chunk == 0 else "")
        lines.append(f"{label:<34}{temp:>18,}{temp / 2**30:>9.3f}{temp / temps[0][1]:>8.3f}")
    return lines


def report(config, results: list[dict]) -> str:
    batch, length = config.train.batch_size, config.data.max_length
    vocab = results[0]["vocab"]
    logits_gib = batch * length * vocab * 4 / 2**30
    lines = [
        f"model {config.model.name}, optim.preset={config.optim.preset}, "
        f"peft.rank={config.peft.rank} ({results[0]['trainable']:,} trainable params), "
        f"batch {batch} x {length} tokens, vocab {vocab:,} "
        f"(full float32 logits: {logits_gib:.2f} GiB), {jax.devices()[0].platform}",
    ]
    if results[0]["temp"] is not None:
        lines += _table("train step", [(r["chunk"], r["temp"]) for r in results])
    lines += _table(
        "LM head + loss only (fwd + bwd)", [(r["chunk"], r["head_temp"]) for r in results]
    )
    return "\n".join(lines)


def main() -> None:
    config = config_flags.DEFINE_config_file(
        "config", str(ROOT / "configs/sft/smollm2_gsm8k_lora.py"), "Experiment config file."
    )
    chunks = flags.DEFINE_list(
        "chunks", ["0", str(DEFAULT_CHUNK)], "model.lm_loss_chunk values; the first is the base."
    )
    length = flags.DEFINE_integer("length", 2048, "data.max_length (tokens per row).")
    batch_size = flags.DEFINE_integer("batch_size", 8, "train.batch_size (rows).")
    train_step = flags.DEFINE_bool(
        "train_step", True, "Compile the whole train step (~1.5 min each on 2 CPU cores)."
    )

    def run(argv):
        del argv
        quiet_libraries()
        cfg = config.value
        cfg.data.max_length, cfg.train.batch_size = length.value, batch_size.value
        results = [step_memory(cfg, int(c), train_step.value) for c in chunks.value]
        print(report(cfg, results))

    app.run(run)


if __name__ == "__main__":
    main()
