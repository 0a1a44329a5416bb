"""Command builders for multi-host runs: a TPU pod over `gcloud ... ssh --worker=all`, or SLURM.

Pure functions from arguments to argv lists and script text: no files, no processes, so the
exact commands are unit-tested and `tools/launch_*.py --dry-run` prints what would run.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from collections.abc import Sequence

TRAIN_MODULE = ("python", "-m", "finetune_jax.train")
_GCLOUD_TPU = ("gcloud", "compute", "tpus", "tpu-vm")
# What a TPU worker needs to install and run; not .venv, runs/ or .git.
SYNC_PATHS = ("pyproject.toml", "README.md", "finetune_jax", "configs", "tools")
# The SLURM script sets these per task; a value from the user would contradict it.
DISTRIBUTED_FLAGS = ("--coordinator_address", "--num_processes", "--process_id")
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


@dataclasses.dataclass(frozen=True)
class SlurmLayout:
    """How a job's processes sit on its nodes, and what each task's environment says.

    GPU nodes: one JAX process per GPU (`"gpu"`) or per node (`"node"`). CPU nodes
    (`gpus_per_node=0`): `"node"` or a number of processes per node, each with
    `cpu_devices_per_process` (fake) CPU devices, as tests do on one machine.
    """

    nodes: int
    gpus_per_node: int
    tasks_per_node: int
    cpus_per_task: int
    cpu_devices_per_process: int = 1
    per_gpu: bool = False  # GPU nodes: one process per GPU, which sees only its own GPU

    def sbatch_options(self) -> list[str]:
        gpus = [f"--gpus-per-node={self.gpus_per_node}"] if self.gpus_per_node else []
        return [
            f"--nodes={self.nodes}",
            f"--ntasks-per-node={self.tasks_per_node}",
            *gpus,
            f"--cpus-per-task={self.cpus_per_task}",
        ]

    def task_env(self) -> list[str]:
        """`NAME=value` words (shell text, expanded in each task) before the trainer."""
        if not self.gpus_per_node:
            env = ["JAX_PLATFORMS=cpu"]
            if self.cpu_devices_per_process > 1:
                flag = f"--xla_force_host_platform_device_count={self.cpu_devices_per_process}"
                # After any inherited XLA_FLAGS: XLA's last value of a flag wins.
                env.append(f'XLA_FLAGS="${{XLA_FLAGS:+$XLA_FLAGS }}{flag}"')
            return env
        # Under SLURM, jax.distributed restricts each process to GPU number $SLURM_LOCALID
        # unless told which GPUs are its own: name them.
        if self.per_gpu:
            return ["CUDA_VISIBLE_DEVICES=$SLURM_LOCALID", "JAX_LOCAL_DEVICE_IDS=0"]
        return [f"JAX_LOCAL_DEVICE_IDS={','.join(map(str, range(self.gpus_per_node)))}"]

    def describe(self) -> str:
        if self.gpus_per_node:
            mode = "one JAX process per GPU" if self.per_gpu else "one JAX process per node"
            return f"{self.nodes} node(s) x {self.gpus_per_node} GPU(s), {mode}"
        per_node = f"{self.tasks_per_node} JAX process(es) per node"
        devices = f"{self.cpu_devices_per_process} CPU device(s) each"
        return f"{self.nodes} CPU node(s), {per_node}, {devices}"


def slurm_layout(
    nodes: int,
    gpus_per_node: int,
    processes_per_node: str | int | None = None,
    cpus_per_gpu: int = 8,
    cpus_per_process: int | None = None,
    cpu_devices_per_process: int = 1,
) -> SlurmLayout:
    """Check the sizes of a job and place its processes (see `SlurmLayout`).

    `processes_per_node` None means `"gpu"` on GPU nodes and `"node"` on CPU nodes;
    `cpus_per_process` (CPU nodes only) defaults to 1.
    """
    if processes_per_node is None:
        processes_per_node = "gpu" if gpus_per_node else "node"
    if nodes < 1:
        raise ValueError(f"nodes must be >= 1, got {nodes}")
    if gpus_per_node < 0:
        raise ValueError(f"gpus_per_node must be >= 0 (0: CPU nodes), got {gpus_per_node}")
    if gpus_per_node:
        return _gpu_layout(
            nodes,
            gpus_per_node,
            processes_per_node,
            cpus_per_gpu,
            cpus_per_process,
            cpu_devices_per_process,
        )
    if processes_per_node == "gpu":
        raise ValueError(
            "processes_per_node='gpu' needs GPUs: on CPU nodes (gpus_per_node=0) give "
            "'node' or a number of processes per node"
        )
    tasks = 1 if processes_per_node == "node" else processes_per_node
    if not isinstance(tasks, int) or isinstance(tasks, bool) or tasks < 1:
        raise ValueError(
            "processes_per_node on CPU nodes must be 'node' or a number >= 1, got "
            f"{processes_per_node!r}"
        )
    for name, value in (
        ("cpus_per_process", 1 if cpus_per_process is None else cpus_per_process),
        ("cpu_devices_per_process", cpu_devices_per_process),
    ):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    return SlurmLayout(nodes, 0, tasks, cpus_per_process or 1, cpu_devices_per_process)


def _gpu_layout(nodes, gpus, processes_per_node, cpus_per_gpu, cpus_per_process, cpu_devices):
    """`slurm_layout` for GPU nodes (`gpus` >= 1)."""
    if processes_per_node not in ("gpu", "node"):
        raise ValueError(
            f"processes_per_node on GPU nodes must be 'gpu' or 'node', got {processes_per_node!r}"
            " (a number of processes per node is for CPU nodes: gpus_per_node=0)"
        )
    if cpus_per_process is not None or cpu_devices != 1:
        raise ValueError(
            "cpus_per_process and cpu_devices_per_process are for CPU nodes (gpus_per_node=0); "
            "GPU nodes take cpus_per_gpu"
        )
    if cpus_per_gpu < 1:
        raise ValueError(f"cpus_per_gpu must be >= 1, got {cpus_per_gpu}")
    if processes_per_node == "gpu":
        return SlurmLayout(nodes, gpus, gpus, cpus_per_gpu, per_gpu=True)
    return SlurmLayout(nodes, gpus, 1, cpus_per_gpu * gpus)


def _sbatch_options(
    job_name: str,
    layout: SlurmLayout,
    time: str,
    partition: str | None,
    extra_sbatch: Sequence[str],
) -> list[str]:
    """The `#SBATCH` options, after checking the values that go into them."""
    if not _NAME.fullmatch(job_name or ""):
        raise ValueError(f"job name must be letters, digits, '_', '.', '-', got {job_name!r}")
    if not time or any(c.isspace() for c in time):
        raise ValueError(f"time must be a SLURM time limit like 24:00:00, got {time!r}")
    bad = [s for s in extra_sbatch if not s.startswith("-") or "\n" in s]
    if bad:
        raise ValueError(f"extra sbatch options must look like --account=NAME, got {bad}")
    return [
        f"--job-name={job_name}",
        *layout.sbatch_options(),
        f"--time={time}",
        "--output=logs/%x-%j.out",
        *([f"--partition={partition}"] if partition else []),
        *extra_sbatch,
    ]


def _task_command(train_args: Sequence[str], layout: SlurmLayout) -> str:
    """The shell command one SLURM task runs: the trainer with this task's process flags."""
    check_train_args(train_args)
    given = [a for a in train_args if a.split("=", 1)[0] in DISTRIBUTED_FLAGS]
    if given:
        raise ValueError(f"{', '.join(given)}: the SLURM script sets these for each task")
    return (
        f"{' '.join(layout.task_env())} exec {shlex.join([*TRAIN_MODULE, *train_args])}"
        ' --coordinator_address="$COORD:$PORT"'
        ' --num_processes="$SLURM_NTASKS" --process_id="$SLURM_PROCID"'
    )


def slurm_script(
    job_name: str,
    layout: SlurmLayout,
    train_args: Sequence[str],
    partition: str | None = None,
    time: str = "24:00:00",
    repo_dir: str | None = None,
    venv: str = ".venv",
    extra_sbatch: Sequence[str] = (),
    port: int | None = None,
) -> str:
    """A complete sbatch script that runs the train module with `layout`'s processes.

    `repo_dir` None means the directory sbatch was called from; `venv` (relative to it)
    "" skips activation. `port` None: the coordinator's port is the one jax.distributed's
    SLURM autodetection picks, 61440 + job id % 4096, so jobs sharing a node do not collide.
    """
    options = _sbatch_options(job_name, layout, time, partition, extra_sbatch)
    task = _task_command(train_args, layout)
    cd_dir = remote_path(repo_dir) if repo_dir else '"$SLURM_SUBMIT_DIR"'
    port_value = str(port) if port else "$((61440 + SLURM_JOB_ID % 4096))"
    lines = [
        "#!/bin/bash",
        *(f"#SBATCH {option}" for option in options),
        f"# {layout.describe()}. Written by finetune_jax.cluster.launch_commands.",
        "set -eo pipefail",
        f"cd {cd_dir}",
        *([f". {remote_path(venv)}/bin/activate"] if venv else []),
        "set -u  # after activate, which reads unset variables",
        "# Process 0 runs on the first host of the allocation; every process dials it there.",
        # sed reads all of scontrol's output: `head -n 1` may close the pipe early, and
        # under pipefail scontrol's SIGPIPE (exit 141) would end the job.
        'COORD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)',
        f"PORT={port_value}",
        "export COORD PORT",
        "# One failed task ends the job instead of leaving the others blocked in a collective.",
        # Single-quoted `bash -c`: SLURM_PROCID and SLURM_LOCALID must expand in each task.
        f"srun --kill-on-bad-exit=1 bash -c {shlex.quote(task)}",
    ]
    return "\n".join(lines) + "\n"


def slurm_submit_command(script_path: str, wait: bool = False) -> list[str]:
    """The argv that submits a script written by `slurm_script`; `wait`: sbatch returns when
    the job ends, with its exit code."""
    _require(script_path, "script path")
    return ["sbatch", *(["--wait"] if wait else []), script_path]
