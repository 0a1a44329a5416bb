"""Compile time of a Llama train step at two depths, unrolled vs scanned (`model.scan_layers`).

  python tools/compile_time.py [--layers=8,32] [--hidden=256] [--batch=4] [--length=128] \\
      [--remat=none] [--json=out.json]

For each depth and layout it builds a random small-width `LlamaConfig` (no weights: params
stay abstract, from `jax.eval_shape`), the run's own full fine-tuning AdamW (`optim.preset`
full, clipping included) and train step (`steps.train_step`, next-token loss) on a batch of
`--batch` x `--length` tokens, and times `jax.jit(train_step).lower(state, batch)` and
`.compile()`, each in a fresh jit (`--repeats` rounds, the fastest kept). Prints both phases
and their sum side by side, plus the size of the lowered program (StableHLO text), which the
scan keeps independent of depth.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from finetune_jax.cluster import sharding  # noqa: E402
from finetune_jax.config import base_config  # noqa: E402
from finetune_jax.models import llama  # noqa: E402
from finetune_jax.tasks import losses  # noqa: E402
from finetune_jax.training import optim, steps  # noqa: E402
from finetune_jax.training.state import create_train_state  # noqa: E402

LAYERS = flags.DEFINE_list("layers", ["8", "32"], "Depths to compare.")
HIDDEN = flags.DEFINE_integer("hidden", 256, "hidden_size (intermediate 3x, head_dim 32).")
VOCAB = flags.DEFINE_integer("vocab", 8192, "vocab_size.")
BATCH = flags.DEFINE_integer("batch", 4, "Rows per batch.")
LENGTH = flags.DEFINE_integer("length", 128, "Tokens per row.")
REMAT = flags.DEFINE_string("remat", "none", "model.remat: none | full | dots_saveable.")
REPEATS = flags.DEFINE_integer("repeats", 2, "Rounds over all cells; the fastest is reported.")
JSON = flags.DEFINE_string("json", "", "Also write the figures to this file.")


def model_config(layers: int, scan: bool) -> llama.LlamaConfig:
    heads = HIDDEN.value // 32
    return llama.LlamaConfig(
        vocab_size=VOCAB.value,
        hidden_size=HIDDEN.value,
        intermediate_size=3 * HIDDEN.value,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(heads // 2, 1),
        max_position_embeddings=max(LENGTH.value, 128),
        remat=REMAT.value,
        scan_layers=scan,
    )


def abstract_step(config: llama.LlamaConfig):
    """(jitted train step bound to a 1-device mesh, abstract state, abstract batch)."""
    run = base_config()
    run.optim.preset = "full"
    boxed = jax.eval_shape(functools.partial(llama.init_params, config), jax.random.key(0))
    params = nn.unbox(boxed)
    groups = optim.param_groups(run.optim, params, llama.FAMILY.layer_stacks(config))
    tx, lr_fn = optim.make_optimizer(run.optim, groups, total_steps=1000)
    state = jax.eval_shape(lambda p: create_train_state(p, tx, run.seed), params)
    shape = (BATCH.value, LENGTH.value)
    batch = {
        "input_ids": jax.ShapeDtypeStruct(shape, jnp.int32),
        "attention_mask": jax.ShapeDtypeStruct(shape, jnp.int32),
        "labels": jax.ShapeDtypeStruct(shape, jnp.int32),
        "weights": jax.ShapeDtypeStruct(shape, jnp.float32),
    }
    objective = functools.partial(
        steps.logits_objective,
        apply_fn=llama.LlamaForCausalLM(config).apply,
        loss_fn=losses.next_token_loss,
    )
    train_fn = functools.partial(
        steps.train_step,
        objective=objective,
        tx=tx,
        lr_fn=lr_fn,
        trainable=groups.trainable,
    )
    mesh = sharding.make_mesh(run.mesh, jax.devices()[:1])
    bound = sharding.MeshBound(
        jax.jit(train_fn, donate_argnums=(0,)), mesh, sharding.logical_rules(run)
    )
    return bound, state, batch


def measure(layers: int, scan: bool) -> dict:
    step, state, batch = abstract_step(model_config(layers, scan))
    start = time.perf_counter()
    lowered = step.lower(state, batch)
    lowered_at = time.perf_counter()
    lowered.compile()
    done = time.perf_counter()
    return {
        "layers": layers,
        "layout": "scanned" if scan else "unrolled",
        "lower_s": lowered_at - start,
        "compile_s": done - lowered_at,
        "total_s": done - start,
        "hlo_kb": len(lowered.as_text()) / 1024,
    }


def main(argv: list[str]) -> None:
    del argv
    depths = [int(n) for n in LAYERS.value]
    measure(1, False)  # first-use costs (imports, XLA start-up) go to no cell
    cells = [(n, scan) for n in depths for scan in (False, True)]
    # Rounds interleave the cells, so a busy spell of a shared machine hits no cell alone.
    rounds = [[measure(n, scan) for n, scan in cells] for _ in range(REPEATS.value)]
    rows = [min(runs, key=lambda r: r["total_s"]) for runs in zip(*rounds)]
    print(
        f"Llama train step, hidden {HIDDEN.value}, vocab {VOCAB.value}, batch "
        f"{BATCH.value} x {LENGTH.value}, remat {REMAT.value}, full fine-tuning AdamW, "
        f"{jax.devices()[0].platform}"
    )
    print(
        f"{'layers':>6} {'layout':>9} {'lower s':>8} {'compile s':>10} {'total s':>8} {'HLO KB':>8}"
    )
    for r in rows:
        print(
            f"{r['layers']:>6} {r['layout']:>9} {r['lower_s']:>8.2f} {r['compile_s']:>10.2f} "
            f"{r['total_s']:>8.2f} {r['hlo_kb']:>8.0f}"
        )
    if JSON.value:
        Path(JSON.value).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    app.run(main)
