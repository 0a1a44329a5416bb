"""Will it fit? Compile the train step ahead of time for a target mesh and report per-device memory.

  python tools/preflight.py --config=configs/glue/sst2_minilm.py --mesh=fsdp=8 --devices=8
  python tools/preflight.py --config=configs/glue/sst2_minilm.py --mesh=data=8 --devices=8 --json=out.json

`--devices=N` fakes N CPU devices (set before jax starts), so a pod's mesh can be checked on a
laptop. Nothing is trained: the step is lowered on abstract (shape-only) state and the longest
bucket, and XLA's compiled memory and cost analyses are printed next to the per-device bytes
of params and optimizer state implied by the shardings.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def _fake_devices_from_argv() -> None:
    # XLA reads the device count once, when jax starts: set it before importing jax.
    for arg in sys.argv[1:]:
        if arg.startswith("--devices="):
            flags = os.environ.get("XLA_FLAGS", "")
            os.environ["XLA_FLAGS"] = (
                f"{flags} --xla_force_host_platform_device_count={arg.split('=')[1]}"
            )
            os.environ.setdefault("JAX_PLATFORMS", "cpu")


_fake_devices_from_argv()
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from finetune_jax.cli import quiet_libraries  # noqa: E402
from finetune_jax.training import builder, optim  # noqa: E402


def per_device_bytes(abstract_tree, shardings) -> int:
    """Bytes one device holds of a tree, from each leaf's shard shape."""
    total = 0
    for leaf, sharding in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings)):
        total += int(np.prod(sharding.shard_shape(leaf.shape))) * leaf.dtype.itemsize
    return total


def parse_mesh(text: str) -> dict[str, int]:
    """'data=2,fsdp=4' -> {'data': 2, 'fsdp': 4, other axes 1}."""
    mesh = {"data": 1, "fsdp": 1, "tensor": 1}
    for part in filter(None, text.split(",")):
        name, _, size = part.partition("=")
        if name not in mesh or not size.lstrip("-").isdigit():
            raise ValueError(f"--mesh part {part!r}: use axis=size with axis in {list(mesh)}")
        mesh[name] = int(size)
    return mesh


def preflight(config) -> dict:
    """Compile the train step for config.mesh on abstract inputs; return the figures."""
    exp = builder.build(config)
    state = exp.abstract_state()
    length = max(config.data.buckets) if config.data.buckets else config.data.max_length
    batch_size = config.train.batch_size
    shapes = {
        "input_ids": (batch_size, length),
        "attention_mask": (batch_size, length),
        "token_type_ids": (batch_size, length),
        "weights": (batch_size,),
        "labels": (batch_size,),
    }
    dtypes = {"weights": np.float32, "labels": np.float32 if exp.task.num_labels == 1 else np.int32}
    batch = {
        k: jax.ShapeDtypeStruct(s, dtypes.get(k, np.int32), sharding=exp.batch_sharding)
        for k, s in shapes.items()
    }
    compiled = exp.train_step.lower(state, batch).compile()
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    trainable, frozen = optim.param_counts(exp.groups, exp.params)
    return {
        "mesh": dict(exp.mesh.shape),
        "devices": jax.device_count(),
        "batch_shape": [batch_size, length],
        "trainable_params": trainable,
        "frozen_params": frozen,
        "params_bytes_per_device": per_device_bytes(state.params, exp.state_sharding.params),
        "opt_state_bytes_per_device": per_device_bytes(
            state.opt_state, exp.state_sharding.opt_state
        ),
        "arguments_bytes_per_device": getattr(memory, "argument_size_in_bytes", None),
        "outputs_bytes_per_device": getattr(memory, "output_size_in_bytes", None),
        "temp_bytes_per_device": getattr(memory, "temp_size_in_bytes", None),
        "code_bytes": getattr(memory, "generated_code_size_in_bytes", None),
        "flops_per_step_per_device": float(cost.get("flops", float("nan"))),
        "total_optimizer_state_bytes": optim.tree_bytes(state.opt_state),
    }


def format_table(result: dict) -> str:
    lines = []
    for key, value in result.items():
        if isinstance(value, (int, float)) and key.endswith("bytes") or "_bytes_" in key:
            value = "n/a" if value is None else f"{value / 2**20:,.2f} MiB"
        elif isinstance(value, float):
            value = f"{value:.4g}"
        elif isinstance(value, int):
            value = f"{value:,}"
        lines.append(f"{key:<32}{value}")
    return "\n".join(lines)


def main() -> None:
    config = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
    mesh = flags.DEFINE_string(
        "mesh", "", "Target mesh, e.g. 'fsdp=8' or 'data=2,fsdp=2,tensor=2'."
    )
    flags.DEFINE_integer("devices", 0, "Fake this many CPU devices (0: use the real ones).")
    out = flags.DEFINE_string("json", "", "Also write the figures to this JSON file.")
    flags.mark_flags_as_required(["config"])

    def run(argv):
        quiet_libraries()
        cfg = config.value
        if mesh.value:
            for axis, size in parse_mesh(mesh.value).items():
                cfg.mesh[axis] = size
        result = preflight(cfg)
        print(format_table(result))
        if out.value:
            Path(out.value).write_text(json.dumps(result, indent=2))

    app.run(run)


if __name__ == "__main__":
    main()
