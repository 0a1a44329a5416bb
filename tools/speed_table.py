"""The README's speed table, in one command and one sitting:

  python tools/speed_table.py [--steps=40] [--sft_steps=5] [--tests] [--markdown=table.md] \\
      [--json=table.json] [--peer=../shared/tools/peer_torch_glue.py]

Rows, each timed with tools/bench.py's `bench` (real batches, each shape's compile untimed,
mean of the timed steps) one after another in this process, the PyTorch peer right after the
row it compares with (same data, batch, max length and lr):

  MiniLM SST-2, full fine-tuning   configs/glue/sst2_minilm.py               peer: full
  MiniLM SST-2, linear probe       + optim.preset=linear_probe optim.lr=1e-3  peer: linear_probe
  MiniLM SST-2, LoRA r=8           + peft.rank=8 optim.preset=lora            (no peer mode)
  SmolLM2-135M GSM8K SFT, LoRA     configs/sft/smollm2_gsm8k_lora.py
  SmolLM2-135M GSM8K SFT, full     + optim.preset=full peft.rank=0 optim.lr=5e-5
  DINOv2-S Fashion-MNIST, full     configs/vision/fashion_mnist_dinov2.py:full, batch 16,
                                   112 px, no augmentation  peer: tools/peer_torch_vision.py

Utilisation is achieved GFLOP/s (XLA's cost analysis of each compiled shape; of the unrolled
step for scanned layers, tools/step_flops.py) over the peak
of a large float32 matmul measured in the same sitting. `--tests` also times the default
test run (`python -m pytest`). Measure on a quiet machine: on 2 cores any other process
moves both sides.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
_spec = importlib.util.spec_from_file_location("bench", REPO / "tools" / "bench.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

from configs.glue.sst2_minilm import get_config as glue_config  # noqa: E402
from configs.sft.smollm2_gsm8k_lora import get_config as sft_config  # noqa: E402
from configs.vision.fashion_mnist_dinov2 import get_config as vision_config  # noqa: E402


class Row(NamedTuple):
    """One table row: a config variant, the data it reads (a key of `data_dirs`), its
    PyTorch peer (None, or (`peer_scripts` key, peer mode)) and how long it is timed (a key
    of `timing`). `group` pairs the SFT rows for the LoRA / full ratio."""

    name: str
    make: Callable[[], Any]
    overrides: str
    data: str
    peer: tuple[str, str] | None = None
    timing: str = "glue"
    group: str = ""


_VISION = "train.batch_size=16,data.augment=False"  # the vision peer's batch; no augmentation
ROWS = (
    Row("MiniLM SST-2, full fine-tuning", glue_config, "", "glue", ("glue", "full")),
    Row(
        "MiniLM SST-2, linear probe",
        glue_config,
        "optim.preset=linear_probe,optim.lr=1e-3",
        "glue",
        ("glue", "linear_probe"),
    ),
    Row("MiniLM SST-2, LoRA r=8", glue_config, "peft.rank=8,optim.preset=lora", "glue"),
    Row("SmolLM2-135M GSM8K SFT, LoRA r=8", sft_config, "", "gsm8k", timing="sft", group="sft"),
    Row(
        "SmolLM2-135M GSM8K SFT, full",
        sft_config,
        "optim.preset=full,peft.rank=0,optim.lr=5e-5",
        "gsm8k",
        timing="sft",
        group="sft",
    ),
    Row(
        "DINOv2-S Fashion-MNIST 112 px, full fine-tuning",
        lambda: vision_config("full"),
        _VISION,
        "fashion_mnist",
        ("vision", "full"),
        timing="vision",
    ),
)


def time_tests() -> float:
    """Wall seconds of the default test run (the README's test command)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=REPO)
    return time.perf_counter() - start


def markdown(rows: list[dict], peak: float, tests_s: float | None, header: str) -> str:
    lines = [
        header,
        "",
        "| run | s/step | samples/s | GFLOP/s | utilisation | peer s/step | speed vs peer |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        peer = r.get("peer_step_s")
        lines.append(
            f"| {r['name']} | {r['step_s_mean']:.3f} | {r['samples_per_s']:.2f} | "
            f"{r['achieved_gflops']:.1f} | {r['achieved_gflops'] / peak:.2f} | "
            + (f"{peer:.3f} | **{peer / r['step_s_mean']:.2f}x** |" if peer else "- | - |")
        )
    sft = {r["name"].rsplit(", ", 1)[1]: r for r in rows if r.get("group") == "sft"}
    if {"LoRA r=8", "full"} <= set(sft):
        ratio = sft["LoRA r=8"]["step_s_mean"] / sft["full"]["step_s_mean"]
        lines += ["", f"SFT LoRA / full step time: {ratio:.2f}."]
    if tests_s is not None:
        lines += ["", f"Default test run (`python -m pytest`): {tests_s / 60:.1f} min."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=40, help="timed steps per MiniLM row")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--sft_steps", type=int, default=5, help="timed steps per SFT row")
    ap.add_argument("--sft_warmup", type=int, default=2)
    ap.add_argument("--vision_steps", type=int, default=10, help="timed steps, DINOv2 row")
    ap.add_argument("--vision_warmup", type=int, default=3)
    ap.add_argument("--peer", default=str(REPO.parent / "shared/tools/peer_torch_glue.py"))
    ap.add_argument("--glue_dir", default=str(REPO.parent / "shared/data/glue/sst2"))
    ap.add_argument("--gsm8k_dir", default=str(REPO.parent / "shared/data/gsm8k"))
    ap.add_argument("--fashion_mnist_dir", default=str(REPO.parent / "shared/data/fashion_mnist"))
    ap.add_argument("--tests", action="store_true", help="also time the default test run")
    ap.add_argument("--markdown", default="")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    data_dirs = {"glue": args.glue_dir, "gsm8k": args.gsm8k_dir}
    data_dirs["fashion_mnist"] = args.fashion_mnist_dir
    peer_scripts = {"glue": args.peer, "vision": str(REPO / "tools" / "peer_torch_vision.py")}
    timing = {
        "glue": (args.steps, args.warmup),
        "sft": (args.sft_steps, args.sft_warmup),
        "vision": (args.vision_steps, args.vision_warmup),
    }
    bench.quiet_libraries()
    peak = bench.measure_peak_gflops()
    rows = []
    for spec in ROWS:
        config = bench.with_overrides(spec.make(), spec.overrides)
        config.data.dir = data_dirs[spec.data]
        steps, warmup = timing[spec.timing]
        print(f"{spec.name}: {steps} steps after {warmup} of warm-up", flush=True)
        row = {"name": spec.name, "overrides": spec.overrides, "group": spec.group}
        row.update(bench.bench(config, steps, warmup))
        if spec.peer:
            script, mode = spec.peer
            peer = bench.torch_peer(
                peer_scripts[script], config, warmup + steps, row["model_dir"], mode
            )
            row["peer_step_s"] = peer["torch_step_s"]
        rows.append(row)
    tests_s = time_tests() if args.tests else None
    header = (
        f"Measured {datetime.date.today()} on {os.cpu_count()} CPU cores, commit "
        + subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO
        ).stdout.strip()
        + f"; peak of a 2048^3 float32 matmul: {peak:.0f} GFLOP/s"
        + " (`python tools/speed_table.py"
        + (" --tests" if args.tests else "")
        + "`):"
    )
    table = markdown(rows, peak, tests_s, header)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"peak_gflops": peak, "tests_s": tests_s, "rows": rows}, indent=2)
        )


if __name__ == "__main__":
    main()
