"""Plain helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np

from finetune_jax.config import base_config
from finetune_jax.hf import loading
from finetune_jax.models import bert, llama, whisper
from finetune_jax.training import builder, checkpoints

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def tiny_config(model_dir, data_dir, **train):
    """base_config shrunk to the tiny model: batch 8, 6 steps, eval and save every 3."""
    config = base_config()
    config.model.name = str(model_dir)
    config.data.dir = str(data_dir)
    config.data.max_length = 32
    config.data.buckets = (16, 32)
    config.train.batch_size = 8
    config.train.max_steps = 6
    config.train.log_every = 1
    config.train.eval_every = 3
    config.train.checkpoint_every = 3
    config.train.progress = False
    for key, value in train.items():
        config.train[key] = value
    return config


def final_state(config, workdir):
    """The latest checkpointed state of a run (host arrays), or None without a checkpoint."""
    setup = builder.build(config)
    manager = checkpoints.make_manager(str(workdir), 2, None, read_only=True)
    restored = checkpoints.restore_latest(manager, setup.abstract_state())
    return None if restored is None else jax.device_get(restored[0])


def train_losses(workdir) -> list[tuple[int, float]]:
    """(step, logged train loss) of a run's metrics.jsonl, in order."""
    records = [json.loads(line) for line in open(pathlib.Path(workdir) / "metrics.jsonl")]
    return [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]


def load_bert(model_dir, num_labels=2, **overrides):
    """(config, module, params) of a BERT classifier from an HF dir, as the builder loads it."""
    return loading.load_pretrained(
        bert.FAMILY, str(model_dir), "text_classification", num_labels=num_labels, **overrides
    )


def load_llama(path, **overrides):
    """(config, module, params) of a Llama-family causal LM from an HF dir or GGUF file."""
    return loading.load_pretrained(llama.FAMILY, str(path), "causal_lm", **overrides)


def run_steps(config, steps, devices=None):
    """Build the experiment and run `steps` train steps: (experiment, state, losses)."""
    exp = builder.build(config, devices=devices)
    state = exp.initial_state()
    batches = exp.data.train_batches()
    losses = []
    for _ in range(steps):
        state, metrics = exp.train_step(state, exp.put_batch(next(batches)))
        losses.append(float(metrics["loss"]))
    return exp, state, losses


def check_remat_and_bfloat16(module_cls, config, params, bf16_atol):
    """Remat policies give the same logits; bf16 compute stays close, with float32 logits and
    float32 gradients (params are float32 masters)."""
    import dataclasses

    import jax.numpy as jnp
    import numpy as np

    ids = jnp.arange(20).reshape(2, 10) % config.vocab_size
    mask = jnp.ones_like(ids).at[1, 6:].set(0)
    base = jax.jit(module_cls(config).apply)({"params": params}, ids, mask)
    variants = (
        ({"remat": "full"}, 1e-6),
        ({"remat": "dots_saveable"}, 1e-6),
        ({"dtype": "bfloat16"}, bf16_atol),
    )
    for overrides, atol in variants:
        module = module_cls(dataclasses.replace(config, **overrides))

        def loss(p, module=module):
            logits = module.apply({"params": p}, ids, mask)
            return logits.sum(), logits

        (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        assert logits.dtype == jnp.float32, overrides
        np.testing.assert_allclose(logits, base, atol=atol, err_msg=str(overrides))
        assert jax.tree.structure(grads) == jax.tree.structure(params)
        assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))


def load_whisper(model_dir, **overrides):
    """(config, module, params) of a Whisper encoder-decoder model from an HF dir."""
    return loading.load_pretrained(
        whisper.FAMILY, str(model_dir), "speech_recognition", **overrides
    )


def greedy_decode(
    module, params, input_features, prompt, max_new_tokens, eos_id, suppress=(), begin_suppress=()
):
    """Greedy token ids after `prompt` (ids [P]) for each row of `input_features`, through
    the encoder-decoder interface: encode once, cross K/V once (`init_cache`), a prefill of the
    prompt, then one cached step per token. Token ids in `suppress` are never chosen, those
    in `begin_suppress` not as the first (transformers' Whisper logits processors). Rows
    stop at (and keep) `eos_id`."""
    import jax.numpy as jnp

    slots = len(prompt) + max_new_tokens
    # Params are arguments, not closed over: jit would bake them into the program.
    encode = jax.jit(lambda p, x: module.apply({"params": p}, x, method="encode"))
    init_cache = jax.jit(lambda p, m: module.apply({"params": p}, m, slots, method="init_cache"))
    step = jax.jit(
        lambda p, ids, cache, index: module.apply(
            {"params": p},
            ids,
            cache=cache,
            cache_index=index,
            method="decode",
            last_logits_only=True,
        )
    )
    memory = encode(params, input_features)
    batch = memory.shape[0]
    cache = init_cache(params, memory)
    ids = jnp.broadcast_to(jnp.asarray(prompt, jnp.int32), (batch, len(prompt)))
    logits, cache = step(params, ids, cache, 0)
    out, done = [], np.zeros(batch, bool)
    for index in range(len(prompt), len(prompt) + max_new_tokens):
        scores = np.array(logits[:, -1])
        scores[:, list(suppress)] = -np.inf
        if index == len(prompt):
            scores[:, list(begin_suppress)] = -np.inf
        token = np.where(done, eos_id, scores.argmax(axis=-1))
        out.append(token)
        done |= token == eos_id
        if done.all():
            break
        logits, cache = step(params, jnp.asarray(token[:, None], jnp.int32), cache, index)
    rows = np.stack(out, axis=1).tolist()
    return [row[: row.index(eos_id) + 1] if eos_id in row else row for row in rows]


def speech_clips(count: int) -> list[tuple[str, np.ndarray]]:
    """(reference text, 16 kHz mono float32 audio) of real clips: the English ones of
    PyPI `pytest-audioeval` (human speech) when that package is present, then the first
    validation clips of `../shared/data/speech_commands_synth` (espeak-ng), `count` in all.
    The package is found without importing it: its import pulls in an HTTP client."""
    import importlib.util
    import json

    import soundfile

    def read(path):
        audio, rate = soundfile.read(path, dtype="float32")
        if rate != 16000:
            raise ValueError(f"{path} is sampled at {rate} Hz; these clips should be 16 kHz")
        return audio if audio.ndim == 1 else audio.mean(axis=1)

    clips = []
    spec = importlib.util.find_spec("pytest_audioeval")
    if spec is not None and spec.submodule_search_locations:
        root = pathlib.Path(list(spec.submodule_search_locations)[0]) / "samples/audio/en"
        for wav in sorted(root.glob("*.wav")):
            clips.append((wav.with_suffix(".txt").read_text().strip(), read(wav)))
    data = SHARED_DATA / "speech_commands_synth"
    with open(data / "validation.jsonl") as rows:
        for line in rows:
            if len(clips) >= count:
                break
            row = json.loads(line)
            clips.append((row["text"], read(data / row["audio"])))
    return clips[:count]
