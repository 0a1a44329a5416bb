"""Start a training run on every worker of a Cloud TPU pod slice.

  python tools/launch_tpu.py --tpu=my-v4-32 --zone=us-central2-b [--project=P] \\
      [--sync] [--setup] [--dry-run] -- --config=configs/glue/sst2_minilm.py --workdir=gs://b/sst2

Everything after `--` goes to `python -m finetune_jax.train` unchanged. `--sync` first copies
the repo to every worker, `--setup` then creates the venv and installs (once per TPU VM).
`--dry-run` prints the gcloud commands, one per line, and runs nothing.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from finetune_jax.cluster import launch_commands  # noqa: E402


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str], argparse.ArgumentParser]:
    """The launcher's own flags (before `--`), the train args (after it), and the parser."""
    parser = argparse.ArgumentParser(
        prog="tools/launch_tpu.py",
        usage="%(prog)s --tpu=NAME --zone=ZONE [options] -- "
        "--config=CONFIG --workdir=WORKDIR [--config.key=value ...]",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--tpu", required=True, help="TPU VM name (gcloud compute tpus tpu-vm)")
    parser.add_argument("--zone", required=True, help="zone of the TPU, e.g. us-central2-b")
    parser.add_argument("--project", default=None, help="GCP project (default: gcloud's)")
    parser.add_argument("--repo_dir", default="~/finetune_jax", help="repo path on the workers")
    parser.add_argument(
        "--venv", default=".venv", help="venv path on the workers, relative to --repo_dir"
    )
    parser.add_argument(
        "--sync",
        action="store_true",
        help="copy this repo (code, configs, tools) to every worker first",
    )
    parser.add_argument(
        "--setup",
        action="store_true",
        help="create the venv and install on every worker before training",
    )
    parser.add_argument(
        "--dry-run",
        "--dry_run",
        dest="dry_run",
        action="store_true",
        help="print the commands and run nothing",
    )
    own, train_args = launch_commands.split_train_args(argv)
    return parser.parse_args(own), train_args, parser


def commands(args: argparse.Namespace, train_args: list[str]) -> list[list[str]]:
    """The gcloud argvs in the order they run: sync, setup, train."""
    where = (args.tpu, args.zone, args.project)
    result = []
    if args.sync:
        result += launch_commands.tpu_copy_commands(
            *where, repo_dir=args.repo_dir, local_dir=os.path.relpath(ROOT)
        )
    if args.setup:
        result.append(
            launch_commands.tpu_pod_command(*where, [], args.repo_dir, args.venv, setup=True)
        )
    result.append(launch_commands.tpu_pod_command(*where, train_args, args.repo_dir, args.venv))
    return result


def main(argv: list[str]) -> int:
    args, train_args, parser = parse_args(argv)
    try:
        argvs = commands(args, train_args)
    except ValueError as e:
        parser.error(str(e))
    workdir = launch_commands.workdir_of(train_args)
    if not workdir.startswith("gs://"):
        # Each worker writes its shard of the checkpoint: a worker-local path splits it.
        print(
            f"warning: --workdir={workdir} is not a gs:// path; every worker must see the "
            "same directory (GCS, or an NFS/Filestore mount)",
            file=sys.stderr,
        )
    if args.dry_run:
        print("\n".join(shlex.join(a) for a in argvs))
        return 0
    if shutil.which("gcloud") is None:
        parser.exit(
            2,
            "error: `gcloud` is not on PATH; install the Google Cloud CLI, or add "
            "--dry-run to print the commands without running them\n",
        )
    for a in argvs:
        print(f"+ {shlex.join(a)}", file=sys.stderr, flush=True)
        returncode = subprocess.run(a, check=False).returncode
        if returncode:
            print(f"error: exit status {returncode} from {shlex.join(a[:6])} ...", file=sys.stderr)
            return returncode
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
