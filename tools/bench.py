"""Benchmark the train step of a config: steady-state step time, throughput, FLOP/s.

  python tools/bench.py --config=configs/glue/sst2_minilm.py --steps=30 \\
      --config.data.dir=../shared/data/glue/sst2 [--peak_gflops=300] [--json=out.json] \\
      [--torch_peer=../shared/tools/peer_torch_glue.py]
  python tools/bench.py --config=configs/sft/smollm2_gsm8k_lora.py --steps=5 --warmup=2 \
      --versus=optim.preset=full,peft.rank=0
  python tools/bench.py --config=configs/vision/fashion_mnist_dinov2.py:full --steps=10 \
      --warmup=3 --config.train.batch_size=16 --torch_peer=tools/peer_torch_vision.py

Runs real batches from the config's data pipeline through the jitted train step. The first
`--warmup` steps are timed separately, and each batch shape's first call (its compilation)
runs once untimed before its timed step; the table reports the median and mean of the rest.
FLOPs come from XLA's cost analysis of each compiled shape.
`--torch_peer` runs the transformers+torch reference right afterwards on the same data, batch
size and max length (image tasks: the same model directory and image size,
`tools/peer_torch_vision.py`), and reports the step-time ratio (one sitting, one machine
state). For images, samples/s is images/s.
`--versus` (repeatable) benchmarks variants of the config with other overrides (e.g. LoRA vs
full fine-tuning, or one variant per PEFT method) side by side with it: all are built and
warmed up, then their timed steps take turns, so load that comes and goes falls on all alike;
it reports each variant's ratios of step time, FLOPs and optimizer-state bytes to the config.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from finetune_jax import config as config_lib  # noqa: E402
from finetune_jax.cli import quiet_libraries  # noqa: E402
from finetune_jax.data import text_tasks  # noqa: E402
from finetune_jax.training import builder, optim  # noqa: E402
from tools.step_flops import StepFlops  # noqa: E402


def measure_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Achieved fp32 GFLOP/s of a large jitted matmul: the reference 'peak' on CPU."""
    x = jax.random.normal(jax.random.key(0), (n, n), np.float32)
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        f(x).block_until_ready()
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


class _Run:
    """One config's experiment, train state and batch stream, stepped on demand, so several
    configs can take turns on the machine (`bench_side_by_side`)."""

    def __init__(self, config):
        t_build = time.perf_counter()
        self.config = config
        self.exp = builder.build(config)
        self.batches = self.exp.data.train_batches()
        self.state = self.exp.initial_state()
        self.build_s = time.perf_counter() - t_build
        self.step_flops = StepFlops(config, self.exp.hf_config)
        self.flops_by_shape, self.times, self.tokens = {}, [], []
        self.warmup_s = 0.0

    def step(self, timed: bool) -> None:
        exp, batch = self.exp, next(self.batches)
        shape = tuple((key, value.shape) for key, value in sorted(batch.items()))
        if shape not in self.flops_by_shape:
            device_batch = exp.put_batch(batch)
            lowered = exp.train_step.lower(self.state, device_batch)
            self.flops_by_shape[shape] = self.step_flops(lowered, device_batch)
            # A shape's first call compiles it (or loads it from the compilation cache): run
            # it once untimed, so a bucket first seen after the warm-up is not timed compiling.
            # (Timing the AOT executable above instead would compile once, but its calls ran
            # 0.85 s against the jitted function's 0.71 s per MiniLM step.)
            self.state, metrics = exp.train_step(self.state, exp.put_batch(batch))
            jax.block_until_ready(metrics)
        start = time.perf_counter()
        self.state, metrics = exp.train_step(self.state, exp.put_batch(batch))
        jax.block_until_ready(metrics)
        if timed:
            self.times.append((time.perf_counter() - start, self.flops_by_shape[shape]))
            # Images have no tokens: their tokens_per_s is 0 (samples_per_s is images/s).
            mask = batch.get("attention_mask")
            self.tokens.append(int(mask.sum()) if mask is not None else 0)

    def warm(self, warmup: int) -> None:
        start = time.perf_counter()
        for _ in range(warmup):
            self.step(timed=False)
        self.warmup_s = time.perf_counter() - start

    def result(self) -> dict:
        times = [t for t, _ in self.times]
        mean_s = float(np.mean(times))
        flops = float(np.mean([f for _, f in self.times]))
        return {
            "build_s": self.build_s,
            "warmup_s_incl_compile": self.warmup_s,
            "compiled_train_shapes": self.exp.train_step._cache_size(),
            "steps_timed": len(times),
            "step_s_median": statistics.median(times),
            "step_s_mean": mean_s,
            "samples_per_s": self.config.train.batch_size / mean_s,
            "tokens_per_s": float(np.sum(self.tokens)) / float(np.sum(times)),
            "gflop_per_step": flops / 1e9,
            "achieved_gflops": flops / mean_s / 1e9,
            "trainable_params": optim.param_counts(self.exp.groups, self.exp.abstract_params)[0],
            "optimizer_state_bytes": optim.tree_bytes(self.state.opt_state),
            "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
            "model_dir": self.exp.model_ref,
        }


def bench(config, steps: int, warmup: int) -> dict:
    """Time `warmup + steps` train steps on real batches; returns the figures."""
    return bench_side_by_side([config], steps, warmup)[0]


def bench_side_by_side(configs: list, steps: int, warmup: int) -> list[dict]:
    """Bench several configs in one sitting: each is built and warmed up, then their timed
    steps take turns (step 1 of each, step 2 of each, ...), so a change in the machine's
    load during the run (another job, thermal state) falls on all of them alike and their
    ratios stay fair. All the experiments are held in memory together."""
    runs = [_Run(config) for config in configs]
    for run in runs:
        run.warm(warmup)
    for _ in range(steps):
        for run in runs:
            run.step(timed=True)
    return [run.result() for run in runs]


def torch_peer(script: str, config, steps: int, model_dir: str, mode: str = "full") -> dict:
    """The transformers+torch reference on the same data, batch and max length (image
    tasks: the same model directory and image size), run now so the ratio compares one
    machine state. Peers: `peer_torch_glue.py` (SST-2-style TSVs; `mode` full or
    linear_probe) and `tools/peer_torch_vision.py` (Fashion-MNIST IDX files)."""
    common = ["--steps", str(steps), "--batch", str(config.train.batch_size)]
    common += ["--lr", str(config.optim.lr)]
    if config.data.task not in text_tasks.TASKS:  # the vision peer: one data set
        if config.data.task != "fashion_mnist":
            raise ValueError(
                f"--torch_peer reads text classification files or Fashion-MNIST, not "
                f"data.task={config.data.task!r}; bench configs/vision/fashion_mnist_dinov2.py"
            )
        size = ["--image_size", str(config.data.image_size)]
        data = ["--model_dir", model_dir, "--fashion_mnist", config.data.dir, *size]
    else:
        data = ["--data", config.data.dir, "--max_len", str(config.data.max_length)]
        data += ["--mode", mode]
    command = [sys.executable, script, *data, *common]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    peer = json.loads(done.stdout.strip().splitlines()[-1])
    return {
        "torch_step_s": peer["steady_step_s"],
        "torch_samples_per_s": peer["steady_samples_per_s"],
    }


def with_overrides(config, overrides: str):
    """A copy of `config` with "a.b=value,c.d=value" applied (values parsed as Python
    literals where they parse, else kept as strings)."""
    import ast

    parsed = {}
    for item in filter(None, overrides.split(",")):
        key, _, raw = item.partition("=")
        try:
            parsed[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            parsed[key] = raw
    return config_lib.apply_overrides(config.copy_and_resolve_references(), parsed, "--versus")


def ratios(variant: dict, base: dict) -> dict:
    """The variant's step time, FLOPs and optimizer state over the base config's (> 1: the
    variant costs more)."""
    keys = ("step_s_median", "step_s_mean", "gflop_per_step", "optimizer_state_bytes")
    return {f"ratio_{key}": variant[key] / base[key] if base[key] else float("nan") for key in keys}


def _shown(value) -> str:
    return f"{value:,.4g}" if isinstance(value, float) else str(value)


def print_versus(variants: list[dict]) -> None:
    """One row per variant: its figures and its ratios to the config as given."""
    columns = (
        "step_s_median",
        "ratio_step_s_median",
        "ratio_gflop_per_step",
        "trainable_params",
        "ratio_optimizer_state_bytes",
    )
    print("\nvariants, against the config as given (ratio > 1: the variant costs more):")
    print("| overrides | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for variant in variants:
        cells = [_shown(variant[column]) for column in columns]
        print(f"| `{variant['overrides']}` | " + " | ".join(cells) + " |")


def main() -> None:
    config = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
    steps = flags.DEFINE_integer("steps", 30, "Timed steps after warmup.")
    warmup = flags.DEFINE_integer("warmup", 10, "Untimed steps first (compiles every bucket seen).")
    peak = flags.DEFINE_float("peak_gflops", 0.0, "Peak GFLOP/s; 0 = measure a large matmul.")
    out = flags.DEFINE_string("json", "", "Also write the figures to this JSON file.")
    peer = flags.DEFINE_string(
        "torch_peer",
        "",
        "Path of peer_torch_glue.py (text) or tools/peer_torch_vision.py (images): run it "
        "right after, same batch and length / image size.",
    )
    versus = flags.DEFINE_multi_string(
        "versus",
        [],
        "Overrides 'a.b=v,c.d=w' of a variant to compare; repeat the flag for several. The "
        "config and its variants are benched side by side (their timed steps take turns).",
    )
    flags.mark_flags_as_required(["config"])

    def run(argv):
        quiet_libraries()
        variants = [with_overrides(config.value, overrides) for overrides in versus.value]
        result, *others = bench_side_by_side([config.value, *variants], steps.value, warmup.value)
        result["peak_gflops"] = peak.value or measure_peak_gflops()
        result["utilisation"] = result["achieved_gflops"] / result["peak_gflops"]
        if peer.value:
            steps_run = warmup.value + steps.value
            result.update(torch_peer(peer.value, config.value, steps_run, result["model_dir"]))
            # > 1: our steps are faster than the reference's.
            result["speed_ratio_torch_step_over_ours"] = (
                result["torch_step_s"] / result["step_s_mean"]
            )
        if others:
            result["versus"] = [
                {"overrides": overrides, **other, **ratios(other, result)}
                for overrides, other in zip(versus.value, others)
            ]
        for key, value in result.items():
            if key != "versus":
                print(f"{key:<34}{_shown(value)}")
        if others:
            print_versus(result["versus"])
        if out.value:
            Path(out.value).write_text(json.dumps(result, indent=2))

    app.run(run)


if __name__ == "__main__":
    main()
