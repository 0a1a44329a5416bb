"""Command builders for multi-host runs: a TPU pod over `gcloud ... ssh --worker=all`, or SLURM.

Pure functions from arguments to argv lists and script text: no files, no processes, so the
exact commands are unit-tested and `tools/launch_*.py --dry-run` prints what would run.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence

TRAIN_MODULE = ("python", "-m", "finetune_jax.train")
_GCLOUD_TPU = ("gcloud", "compute", "tpus", "tpu-vm")
# What a TPU worker needs to install and run; not .venv, runs/ or .git.
SYNC_PATHS = ("pyproject.toml", "README.md", "finetune_jax", "configs", "tools")
# The SLURM script sets these per task; a value from the user would contradict it.
DISTRIBUTED_FLAGS = ("--coordinator_address", "--num_processes", "--process_id")
COORDINATOR_PORT = 12345
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def split_train_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split a launcher's argv at the first `--`: (launcher args, train args passed through)."""
    argv = list(argv)
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    return argv[:i], argv[i + 1 :]


def check_train_args(train_args: Sequence[str]) -> None:
    """Raise ValueError unless `train_args` hold `--config=...` and `--workdir=...`."""
    for flag in ("--config=", "--workdir="):
        if not any(a.startswith(flag) and len(a) > len(flag) for a in train_args):
            raise ValueError(
                f"train args must include {flag}VALUE (after `--`), got "
                f"{shlex.join(train_args) or 'none'}"
            )


def workdir_of(train_args: Sequence[str]) -> str:
    """The value of the last `--workdir=` in `train_args` (absl: the last one wins)."""
    check_train_args(train_args)
    return [a for a in train_args if a.startswith("--workdir=")][-1].split("=", 1)[1]


def remote_path(path: str) -> str:
    """`path` quoted for a shell, keeping a leading `~` expandable (quoting `~` stops that)."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


def _require(value: str, what: str) -> None:
    if not value or not value.strip():
        raise ValueError(f"{what} must not be empty")


def tpu_ssh_command(
    tpu_name: str, zone: str, project: str | None, remote_command: str
) -> list[str]:
    """`gcloud compute tpus tpu-vm ssh` running `remote_command` on every worker of the TPU."""
    _require(tpu_name, "TPU name")
    _require(zone, "zone")
    project_flag = [f"--project={project}"] if project else []
    return [
        *_GCLOUD_TPU,
        "ssh",
        tpu_name,
        f"--zone={zone}",
        *project_flag,
        "--worker=all",
        f"--command={remote_command}",
    ]


def tpu_pod_command(
    tpu_name: str,
    zone: str,
    project: str | None,
    train_args: Sequence[str],
    repo_dir: str = "~/finetune_jax",
    venv: str = ".venv",
    setup: bool = False,
) -> list[str]:
    """The gcloud argv that starts training on every worker of a TPU pod slice.

    Every worker runs the same command; `jax.distributed.initialize()` in the train script
    detects the pod, so no coordinator flags are passed. `venv` is relative to `repo_dir`
    unless absolute. With `setup=True` it is instead the one-time setup command (run it
    before training; `train_args` unused): create the venv, `tools/install.sh`, `jax[tpu]` and
    the packages for a gs:// workdir.
    """
    repo, activate = remote_path(repo_dir), f". {remote_path(venv)}/bin/activate"
    if setup:
        # install.sh installs the CPU jax from pyproject; jax[tpu] adds the matching libtpu,
        # and the `gcs` extra's packages let a gs:// workdir be read and written.
        remote = (
            f"cd {repo} && python3 -m venv {remote_path(venv)} && {activate} && "
            "bash tools/install.sh && python -m pip install 'jax[tpu]' gcsfs google-cloud-storage"
        )
    else:
        check_train_args(train_args)
        remote = f"cd {repo} && {activate} && {shlex.join([*TRAIN_MODULE, *train_args])}"
    return tpu_ssh_command(tpu_name, zone, project, remote)


def tpu_copy_commands(
    tpu_name: str,
    zone: str,
    project: str | None,
    repo_dir: str = "~/finetune_jax",
    local_dir: str = ".",
    paths: Sequence[str] = SYNC_PATHS,
) -> list[list[str]]:
    """The argvs that ship the repo to every worker: `mkdir -p repo_dir`, then one scp.

    scp with several sources needs the destination directory to exist, hence the mkdir.
    Only `paths` (relative to `local_dir`) are copied, so a local .venv or runs/ stays home.
    """
    if not paths:
        raise ValueError("nothing to copy: paths is empty")
    mkdir = tpu_ssh_command(tpu_name, zone, project, f"mkdir -p {remote_path(repo_dir)}")
    # scp paths are relative to the remote home already, and sftp may not expand `~`.
    dest = repo_dir[2:] if repo_dir.startswith("~/") else repo_dir
    sources = [f"{local_dir.rstrip('/')}/{p}" for p in paths]
    project_flag = [f"--project={project}"] if project else []
    scp = [
        *_GCLOUD_TPU,
        "scp",
        "--recurse",
        *sources,
        f"{tpu_name}:{dest}",
        f"--zone={zone}",
        *project_flag,
        "--worker=all",
    ]
    return [mkdir, scp]


def _sbatch_options(
    job_name: str,
    nodes: int,
    gpus_per_node: int,
    per_gpu: bool,
    cpus_per_gpu: int,
    time: str,
    partition: str | None,
    extra_sbatch: Sequence[str],
) -> list[str]:
    """The `#SBATCH` options, after checking the values that go into them."""
    if not _NAME.fullmatch(job_name or ""):
        raise ValueError(f"job name must be letters, digits, '_', '.', '-', got {job_name!r}")
    for name, value in (
        ("nodes", nodes),
        ("gpus_per_node", gpus_per_node),
        ("cpus_per_gpu", cpus_per_gpu),
    ):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if not time or any(c.isspace() for c in time):
        raise ValueError(f"time must be a SLURM time limit like 24:00:00, got {time!r}")
    bad = [s for s in extra_sbatch if not s.startswith("-") or "\n" in s]
    if bad:
        raise ValueError(f"extra sbatch options must look like --account=NAME, got {bad}")
    return [
        f"--job-name={job_name}",
        f"--nodes={nodes}",
        f"--ntasks-per-node={gpus_per_node if per_gpu else 1}",
        f"--gpus-per-node={gpus_per_node}",
        f"--cpus-per-task={cpus_per_gpu * (1 if per_gpu else gpus_per_node)}",
        f"--time={time}",
        "--output=logs/%x-%j.out",
        *([f"--partition={partition}"] if partition else []),
        *extra_sbatch,
    ]


def _task_command(train_args: Sequence[str], per_gpu: bool, port: int) -> str:
    """The shell command one SLURM task runs: the trainer with this task's process flags."""
    check_train_args(train_args)
    given = [a for a in train_args if a.split("=", 1)[0] in DISTRIBUTED_FLAGS]
    if given:
        raise ValueError(f"{', '.join(given)}: the SLURM script sets these for each task")
    gpu = "CUDA_VISIBLE_DEVICES=$SLURM_LOCALID " if per_gpu else ""
    return (
        f"{gpu}exec {shlex.join([*TRAIN_MODULE, *train_args])}"
        f' --coordinator_address="$COORD:{port}"'
        ' --num_processes="$SLURM_NTASKS" --process_id="$SLURM_PROCID"'
    )


def slurm_script(
    job_name: str,
    nodes: int,
    gpus_per_node: int,
    train_args: Sequence[str],
    partition: str | None = None,
    time: str = "24:00:00",
    processes_per_node: str = "gpu",
    repo_dir: str | None = None,
    venv: str = ".venv",
    extra_sbatch: Sequence[str] = (),
    cpus_per_gpu: int = 8,
    port: int = COORDINATOR_PORT,
) -> str:
    """A complete sbatch script that runs the train module on `nodes` x `gpus_per_node` GPUs.

    `processes_per_node="gpu"`: one JAX process per GPU, each seeing only its GPU;
    `"node"`: one process per node seeing all of its GPUs. `repo_dir` None means the
    directory sbatch was called from; `venv` (relative to it) "" skips activation.
    """
    if processes_per_node not in ("gpu", "node"):
        raise ValueError(f"processes_per_node must be 'gpu' or 'node', got {processes_per_node!r}")
    per_gpu = processes_per_node == "gpu"
    options = _sbatch_options(
        job_name, nodes, gpus_per_node, per_gpu, cpus_per_gpu, time, partition, extra_sbatch
    )
    task = _task_command(train_args, per_gpu, port)
    mode = "one JAX process per GPU" if per_gpu else "one JAX process per node"
    cd_dir = remote_path(repo_dir) if repo_dir else '"$SLURM_SUBMIT_DIR"'
    lines = [
        "#!/bin/bash",
        *(f"#SBATCH {option}" for option in options),
        f"# {nodes} node(s) x {gpus_per_node} GPU(s), {mode}. Written by finetune_jax.cluster.launch_commands.",
        "set -eo pipefail",
        f"cd {cd_dir}",
        *([f". {remote_path(venv)}/bin/activate"] if venv else []),
        "set -u  # after activate, which reads unset variables",
        "# Process 0 runs on the first host of the allocation; every process dials it there.",
        'COORD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "export COORD",
        "# One failed task ends the job instead of leaving the others blocked in a collective.",
        # Single-quoted `bash -c`: SLURM_PROCID and SLURM_LOCALID must expand in each task.
        f"srun --kill-on-bad-exit=1 bash -c {shlex.quote(task)}",
    ]
    return "\n".join(lines) + "\n"


def slurm_submit_command(script_path: str) -> list[str]:
    """The argv that submits a script written by `slurm_script`."""
    _require(script_path, "script path")
    return ["sbatch", script_path]
