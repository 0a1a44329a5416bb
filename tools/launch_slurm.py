"""Submit a training run to SLURM: GPU nodes, or CPU nodes with fake CPU devices per process.

  python tools/launch_slurm.py --job_name=sst2 --nodes=2 --gpus_per_node=8 [--partition=P] \\
      [--processes_per_node=gpu|node] [--wait] [--dry-run] -- \\
      --config=configs/glue/sst2_minilm.py --workdir=/shared/runs/sst2

  python tools/launch_slurm.py --job_name=cpu --nodes=1 --gpus_per_node=0 \\
      --processes_per_node=2 --cpu_devices_per_process=2 --venv= --wait -- \\
      --config=configs/glue/sst2_minilm.py --workdir=runs/cpu

Everything after `--` goes to `python -m finetune_jax.train` unchanged; the script adds the
coordinator and process flags per task. Without `--dry-run` it writes the sbatch script to
`--script_out` (default logs/JOB.sbatch) and runs `sbatch` on it; job output goes to
logs/JOB-JOBID.out. `--wait` returns when the job ends, with its exit code. `--dry-run`
prints the script, then the sbatch command, and writes nothing.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from finetune_jax.cluster import launch_commands  # noqa: E402


def _processes_per_node(value: str) -> str | int:
    """'gpu', 'node' or a number, as given; slurm_layout says which fits the nodes."""
    return int(value) if value.isdigit() else value


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str], argparse.ArgumentParser]:
    """The launcher's own flags (before `--`), the train args (after it), and the parser."""
    parser = argparse.ArgumentParser(
        prog="tools/launch_slurm.py",
        usage="%(prog)s --job_name=NAME --nodes=N "
        "--gpus_per_node=G [options] -- --config=CONFIG --workdir=WORKDIR [--config.key=value ...]",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--job_name", required=True, help="SLURM job name (also names the logs)")
    parser.add_argument("--nodes", type=int, required=True, help="number of nodes")
    parser.add_argument(
        "--gpus_per_node", type=int, required=True, help="GPUs on each node; 0: CPU nodes"
    )
    parser.add_argument(
        "--partition", default=None, help="SLURM partition (default: the cluster's)"
    )
    parser.add_argument("--time", default="24:00:00", help="time limit (default 24:00:00)")
    parser.add_argument(
        "--processes_per_node",
        type=_processes_per_node,
        default=None,
        metavar="gpu|node|N",
        help="GPU nodes: one JAX process per GPU (default) or one per node seeing all GPUs; "
        "CPU nodes: one per node (default) or N",
    )
    parser.add_argument(
        "--cpus_per_gpu", type=int, default=8, help="GPU nodes: CPUs per GPU (data loading)"
    )
    parser.add_argument(
        "--cpus_per_process", type=int, default=None, help="CPU nodes: CPUs per process (default 1)"
    )
    parser.add_argument(
        "--cpu_devices_per_process",
        type=int,
        default=1,
        help="CPU nodes: JAX CPU devices each process makes (XLA's fake host devices; default 1)",
    )
    parser.add_argument(
        "--repo_dir",
        default=None,
        help="repo path on the nodes (default: the directory sbatch runs from)",
    )
    parser.add_argument(
        "--venv",
        default=".venv",
        help="venv relative to --repo_dir; '' to use the environment sbatch inherits",
    )
    parser.add_argument(
        "--sbatch",
        action="append",
        default=[],
        metavar="OPTION",
        help="extra #SBATCH option, e.g. --sbatch=--account=abc (repeatable)",
    )
    parser.add_argument(
        "--script_out", default=None, help="where to write the script (default logs/JOB.sbatch)"
    )
    parser.add_argument(
        "--wait",
        action="store_true",
        help="return when the job ends, with its exit code (sbatch --wait)",
    )
    parser.add_argument(
        "--dry-run",
        "--dry_run",
        dest="dry_run",
        action="store_true",
        help="print the script and the sbatch command, write and run nothing",
    )
    own, train_args = launch_commands.split_train_args(argv)
    return parser.parse_args(own), train_args, parser


def main(argv: list[str]) -> int:
    args, train_args, parser = parse_args(argv)
    script_path = args.script_out or os.path.join("logs", f"{args.job_name}.sbatch")
    try:
        layout = launch_commands.slurm_layout(
            args.nodes,
            args.gpus_per_node,
            args.processes_per_node,
            cpus_per_gpu=args.cpus_per_gpu,
            cpus_per_process=args.cpus_per_process,
            cpu_devices_per_process=args.cpu_devices_per_process,
        )
        script = launch_commands.slurm_script(
            args.job_name,
            layout,
            train_args,
            partition=args.partition,
            time=args.time,
            repo_dir=args.repo_dir,
            venv=args.venv,
            extra_sbatch=args.sbatch,
        )
        submit = launch_commands.slurm_submit_command(script_path, wait=args.wait)
    except ValueError as e:
        parser.error(str(e))
    if args.dry_run:
        print(script, end="")
        print(shlex.join(submit))
        return 0
    if shutil.which("sbatch") is None:
        parser.exit(
            2,
            "error: `sbatch` is not on PATH (run this on a SLURM login node), or add "
            "--dry-run to print the script and command without running them\n",
        )
    # --output=logs/%x-%j.out is relative to where sbatch runs; SLURM does not create the dir.
    os.makedirs("logs", exist_ok=True)
    os.makedirs(os.path.dirname(script_path) or ".", exist_ok=True)
    with open(script_path, "w") as f:
        f.write(script)
    print(f"wrote {script_path}\n+ {shlex.join(submit)}", file=sys.stderr, flush=True)
    return subprocess.run(submit, check=False).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
