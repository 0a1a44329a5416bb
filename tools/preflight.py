"""Will it fit? Compile the train step for a target mesh without weights and report per-device
memory, FLOPs and a verdict.

  python tools/preflight.py --config=configs/glue/sst2_minilm.py --mesh=fsdp=8 --devices=8
  python tools/preflight.py --config=configs/sft/smollm2_gsm8k_lora.py \\
      --model=configs/models/llama3_8b/config.json --mesh=fsdp=64 --devices=64 \\
      --config.optim.preset=full --config.peft.rank=0 --config.model.param_dtype=bfloat16 \\
      --device_memory=80GiB --json=out.json

Nothing is read but config files: `--model` is an HF config.json, a model directory or a
packaged alias (default: the config's `model.name`), whose weights are never opened, and no
tokenizer or data is loaded. The model, optimizer state and the task's own batch (its
loader's batch spec: classification, regression, packed chat SFT, ...) are shapes only.
`--devices=N` fakes N CPU devices (set before jax starts), so a pod's mesh is checked on a
laptop. Bytes of params and optimizer state come from the shardings; XLA temporaries and
FLOPs from the compiled step (XLA:CPU's analysis: a GPU/TPU compile schedules differently,
so leave headroom); with scanned layers, FLOPs from the unrolled step (tools/step_flops.py).
"""

from __future__ import annotations

import json
import os
import re
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
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from finetune_jax.cli import quiet_libraries, run_main  # noqa: E402
from finetune_jax.hf import model_files  # noqa: E402
from finetune_jax.training import builder, optim  # noqa: E402
from tools.step_flops import StepFlops  # noqa: E402

_UNITS = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 1e3, "mb": 1e6, "gb": 1e9}


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


def parse_bytes(text: str) -> int | None:
    """'80GiB', '16GB', '1e9' -> bytes; '' -> None."""
    match = re.fullmatch(r"\s*([0-9.e+]+)\s*([a-zA-Z]*)\s*", text or "")
    if not text:
        return None
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(
            f"--device_memory={text!r}: use a number with B, KiB, MiB, GiB, KB, MB or GB"
        )
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def read_model_config(model: str) -> dict:
    """The HF config dict of a config.json file, a model directory or an alias; no weights."""
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".json":
        return json.loads(path.read_text())
    return model_files.read_config(model)


def preflight(config, hf_config: dict, device_memory: int | None = None) -> dict:
    """Compile the train step for config.mesh on abstract inputs; return the figures."""
    setup = builder.build(config, hf_config=hf_config)
    state = setup.abstract_state()
    spec = setup.kind.batch_spec(config, setup.task)
    batch = {
        name: jax.ShapeDtypeStruct(shape, dtype, sharding=setup.batch_sharding)
        for name, (shape, dtype) in spec.items()
    }
    compiled = setup.train_step.lower(state, batch).compile()
    memory = compiled.memory_analysis()
    flops = StepFlops(config, hf_config)(compiled, batch)
    trainable, frozen = optim.param_counts(setup.groups, setup.abstract_params)
    params = per_device_bytes(state.params, setup.state_sharding.params)
    opt_state = per_device_bytes(state.opt_state, setup.state_sharding.opt_state)
    temp = getattr(memory, "temp_size_in_bytes", None)
    batch_bytes = per_device_bytes(batch, [setup.batch_sharding] * len(batch))
    needed = params + opt_state + batch_bytes + (temp or 0)
    result = {
        "model": f"{hf_config.get('model_type')} {trainable + frozen:,} params",
        "mesh": dict(setup.mesh.shape),
        "devices": jax.device_count(),
        "batch_shape": list(spec["input_ids"][0]),
        "trainable_params": trainable,
        "frozen_params": frozen,
        "params_bytes_per_device": params,
        "opt_state_bytes_per_device": opt_state,
        "batch_bytes_per_device": batch_bytes,
        "temp_bytes_per_device": temp,
        "total_bytes_per_device": needed,
        "flops_per_step_per_device": flops,
    }
    if device_memory:
        result["device_memory_bytes"] = device_memory
        result["verdict"] = "fits" if needed <= device_memory else "does not fit"
    return result


def format_table(result: dict) -> str:
    lines = []
    for key, value in result.items():
        if key.endswith("bytes") or "_bytes_" in key:
            value = "n/a" if value is None else f"{value / 2**30:,.2f} GiB"
        elif isinstance(value, float):
            value = f"{value:.4g}"
        elif isinstance(value, int):
            value = f"{value:,}"
        lines.append(f"{key:<32}{value}")
    return "\n".join(lines)


def main() -> None:
    config = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
    model = flags.DEFINE_string(
        "model", "", "HF config.json, model directory or alias (default: config.model.name)."
    )
    mesh = flags.DEFINE_string(
        "mesh", "", "Target mesh, e.g. 'fsdp=8' or 'data=2,fsdp=2,tensor=2'."
    )
    flags.DEFINE_integer("devices", 0, "Fake this many CPU devices (0: use the real ones).")
    memory = flags.DEFINE_string("device_memory", "", "Memory of one device, e.g. 80GiB.")
    out = flags.DEFINE_string("json", "", "Also write the figures to this JSON file.")
    flags.mark_flags_as_required(["config"])

    def run(argv):
        quiet_libraries()
        cfg = config.value
        for axis, size in parse_mesh(mesh.value).items() if mesh.value else ():
            cfg.mesh[axis] = size
        hf_config = read_model_config(model.value or cfg.model.name)
        result = preflight(cfg, hf_config, parse_bytes(memory.value))
        print(format_table(result))
        if out.value:
            Path(out.value).write_text(json.dumps(result, indent=2))

    run_main(run)


if __name__ == "__main__":
    main()
