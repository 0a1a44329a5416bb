"""Launch command builders and the tools/launch_*.py CLIs; no gcloud, sbatch or cluster needed.

Generated commands are not only inspected but executed by bash against fake `python`,
`srun`, `scontrol`, `gcloud` and `sbatch` executables, so quoting is checked end to end.
"""

from __future__ import annotations

import os
import pathlib
import shlex
import subprocess
import sys

import pytest

from finetune_jax.cluster import launch_commands

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAIN_ARGS = [
    "--config=configs/glue/sst2_minilm.py",
    "--workdir=gs://bucket/runs/sst2",
    "--config.model.name=my model's dir",
    "--config.optim.lr=3e-5",
]
# Prints its arguments one per line (and the GPU it was given), standing in for the trainer.
FAKE_PYTHON = 'printf "%s\\n" "CUDA=${CUDA_VISIBLE_DEVICES:-unset}" "$@"\n'


def fake_tool(bin_dir: pathlib.Path, name: str, body: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)


def run_cli(
    tool: str, args: list[str], path: str, cwd: pathlib.Path = ROOT
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / tool), *args],
        cwd=cwd,
        env={**os.environ, "PATH": path},
        capture_output=True,
        text=True,
        timeout=60,
    )


def remote_command(argv: list[str]) -> str:
    (command,) = [a for a in argv if a.startswith("--command=")]
    return command.removeprefix("--command=")


# TPU builders.


def test_tpu_pod_command_targets_every_worker():
    argv = launch_commands.tpu_pod_command("my-v4-32", "us-central2-b", "proj", TRAIN_ARGS)
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-v4-32"]
    assert {"--zone=us-central2-b", "--project=proj", "--worker=all"} <= set(argv)
    no_project = launch_commands.tpu_pod_command("my-v4-32", "us-central2-b", None, TRAIN_ARGS)
    assert not any(a.startswith("--project") for a in no_project)


def test_tpu_train_args_survive_a_shlex_round_trip():
    tokens = shlex.split(
        remote_command(launch_commands.tpu_pod_command("t", "z", None, TRAIN_ARGS))
    )
    start = tokens.index("finetune_jax.train") + 1
    assert tokens[start - 2 : start] == ["-m", "finetune_jax.train"]
    assert tokens[start:] == TRAIN_ARGS


def test_tpu_remote_command_runs_train_in_repo_and_venv(tmp_path):
    # The worker's shell: HOME is tmp_path; activating the venv puts the fake python first.
    repo = tmp_path / "finetune_jax"
    fake_tool(tmp_path / "bin", "python", FAKE_PYTHON)
    (repo / ".venv" / "bin").mkdir(parents=True)
    (repo / ".venv" / "bin" / "activate").write_text(f'PATH="{tmp_path}/bin:$PATH"\n')
    command = remote_command(launch_commands.tpu_pod_command("t", "z", None, TRAIN_ARGS))
    out = subprocess.run(
        ["bash", "-c", command],
        env={**os.environ, "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.splitlines() == ["CUDA=unset", "-m", "finetune_jax.train", *TRAIN_ARGS]


def test_tpu_setup_command_installs_on_every_worker():
    argv = launch_commands.tpu_pod_command("t", "z", None, [], repo_dir="/opt/ft", setup=True)
    assert "--worker=all" in argv
    tokens = shlex.split(remote_command(argv))
    assert tokens[:2] == ["cd", "/opt/ft"]
    for step in (
        ["python3", "-m", "venv", ".venv"],
        ["bash", "tools/install.sh"],
        ["python", "-m", "pip", "install", "jax[tpu]"],
    ):
        assert any(tokens[i : i + len(step)] == step for i in range(len(tokens))), step
    assert {"gcsfs", "google-cloud-storage"} <= set(tokens)  # a gs:// workdir needs them
    assert "finetune_jax.train" not in tokens


def test_tpu_copy_commands_make_the_dir_then_scp_the_code():
    mkdir, scp = launch_commands.tpu_copy_commands("t", "z", "p", local_dir="/src/ft")
    assert mkdir[4] == "ssh" and "--worker=all" in mkdir
    assert shlex.split(remote_command(mkdir)) == ["mkdir", "-p", "$HOME/finetune_jax"]
    assert scp[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse"]
    assert {"--worker=all", "--zone=z", "--project=p", "t:finetune_jax"} <= set(scp)
    assert "/src/ft/finetune_jax" in scp and "/src/ft/configs" in scp
    assert not any(".venv" in a or "runs" in a for a in scp)


# SLURM builders.


def sbatch_lines(script: str) -> list[str]:
    return [
        line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH ")
    ]


def srun_line(script: str) -> str:
    (line,) = [line for line in script.splitlines() if line.startswith("srun ")]
    return line


def layout(nodes=2, gpus=8, processes=None, **kwargs):
    return launch_commands.slurm_layout(nodes, gpus, processes, **kwargs)


def test_slurm_script_one_process_per_gpu():
    script = launch_commands.slurm_script("sst2", layout(), TRAIN_ARGS, partition="a100")
    assert script.startswith("#!/bin/bash\n")
    assert sbatch_lines(script) == [
        "--job-name=sst2",
        "--nodes=2",
        "--ntasks-per-node=8",
        "--gpus-per-node=8",
        "--cpus-per-task=8",
        "--time=24:00:00",
        "--output=logs/%x-%j.out",
        "--partition=a100",
    ]
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST"' in script
    inner = shlex.split(srun_line(script))[-1]  # the per-task `bash -c` body
    # jax.distributed would otherwise restrict each process to GPU $SLURM_LOCALID of the one
    # it sees.
    assert inner.startswith(
        "CUDA_VISIBLE_DEVICES=$SLURM_LOCALID JAX_LOCAL_DEVICE_IDS=0 exec python -m "
        "finetune_jax.train"
    )
    for flag in (
        '--coordinator_address="$COORD:$PORT"',
        '--num_processes="$SLURM_NTASKS"',
        '--process_id="$SLURM_PROCID"',
    ):
        assert flag in inner


def test_slurm_script_one_process_per_node():
    script = launch_commands.slurm_script(
        "sst2", layout(4, 8, "node"), TRAIN_ARGS, time="2:00:00", extra_sbatch=["--account=ml"]
    )
    lines = sbatch_lines(script)
    assert {
        "--nodes=4",
        "--ntasks-per-node=1",
        "--gpus-per-node=8",
        "--cpus-per-task=64",
        "--time=2:00:00",
        "--account=ml",
    } <= set(lines)
    assert not any(line.startswith("--partition") for line in lines)
    assert "CUDA_VISIBLE_DEVICES" not in script
    assert "JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7 exec" in srun_line(script)
    assert layout(1, 1, "node").task_env() == ["JAX_LOCAL_DEVICE_IDS=0"]  # not per GPU
    assert "--process_id=" in srun_line(script)


def test_slurm_script_on_cpu_nodes():
    script = launch_commands.slurm_script(
        "cpu", layout(1, 0, 2, cpu_devices_per_process=4, cpus_per_process=3), TRAIN_ARGS
    )
    assert sbatch_lines(script) == [
        "--job-name=cpu",
        "--nodes=1",
        "--ntasks-per-node=2",
        "--cpus-per-task=3",
        "--time=24:00:00",
        "--output=logs/%x-%j.out",
    ]
    assert "CPU node(s), 2 JAX process(es) per node, 4 CPU device(s) each" in script
    inner = shlex.split(srun_line(script))[-1]
    assert "CUDA_VISIBLE_DEVICES" not in inner and "JAX_LOCAL_DEVICE_IDS" not in inner
    assert inner.startswith("JAX_PLATFORMS=cpu XLA_FLAGS=")
    # Defaults: one process per CPU node, one CPU, JAX's one CPU device (no XLA_FLAGS).
    default = launch_commands.slurm_layout(3, 0)
    assert default.sbatch_options() == ["--nodes=3", "--ntasks-per-node=1", "--cpus-per-task=1"]
    assert default.task_env() == ["JAX_PLATFORMS=cpu"]
    assert launch_commands.slurm_layout(1, 0, "node").tasks_per_node == 1


def test_slurm_script_is_valid_bash(tmp_path):
    path = tmp_path / "job.sbatch"
    for nodes in (layout(), layout(1, 0, 2, cpu_devices_per_process=2)):
        path.write_text(launch_commands.slurm_script("j", nodes, TRAIN_ARGS, repo_dir="/shared/ft"))
        subprocess.run(["bash", "-n", str(path)], check=True)


def test_slurm_script_gives_each_task_its_process_id_and_gpu(tmp_path):
    # srun starts the same command for two tasks; scontrol names the allocation's hosts, as
    # many as a big job has: a reader that stops after the first line would kill scontrol with
    # SIGPIPE, and under pipefail the job with it (exit 141).
    fake_tool(
        tmp_path / "bin",
        "srun",
        'shift\nfor i in 0 1; do SLURM_PROCID=$i SLURM_LOCALID=$i "$@"; echo ---; done\n',
    )
    fake_tool(
        tmp_path / "bin",
        "scontrol",
        'echo node-a; echo node-b; for i in $(seq 20000); do echo "node-$i"; done\n',
    )
    fake_tool(tmp_path / "bin", "python", FAKE_PYTHON)
    script = tmp_path / "job.sbatch"
    script.write_text(
        launch_commands.slurm_script(
            "sst2", layout(2, 1), TRAIN_ARGS, repo_dir=str(tmp_path), venv=""
        )
    )
    env = {
        **os.environ,
        "PATH": f"{tmp_path}/bin:{os.environ['PATH']}",
        "SLURM_JOB_NODELIST": "node-[a-b]",
        "SLURM_NTASKS": "2",
        "SLURM_JOB_ID": "4099",  # the coordinator's port: 61440 + 4099 % 4096
    }
    out = subprocess.run(
        ["bash", str(script)], env=env, capture_output=True, text=True, check=True
    ).stdout
    tasks = [chunk.strip().splitlines() for chunk in out.split("---") if chunk.strip()]
    assert tasks == [
        [
            f"CUDA={i}",
            "-m",
            "finetune_jax.train",
            *TRAIN_ARGS,
            "--coordinator_address=node-a:61443",
            "--num_processes=2",
            f"--process_id={i}",
        ]
        for i in (0, 1)
    ]


def test_slurm_cpu_tasks_get_their_fake_devices(tmp_path):
    # An inherited XLA_FLAGS is kept, and the launcher's device count comes last (XLA's last
    # value wins).
    fake_tool(tmp_path / "bin", "srun", 'shift\nSLURM_PROCID=1 "$@"\n')
    fake_tool(tmp_path / "bin", "scontrol", "echo localhost\n")
    fake_tool(tmp_path / "bin", "python", 'echo "$JAX_PLATFORMS|$XLA_FLAGS"; printf "%s\\n" "$@"\n')
    script = tmp_path / "job.sbatch"
    script.write_text(
        launch_commands.slurm_script(
            "cpu",
            layout(1, 0, 2, cpu_devices_per_process=2),
            TRAIN_ARGS,
            repo_dir=str(tmp_path),
            venv="",
            port=5000,
        )
    )
    env = {
        **os.environ,
        "PATH": f"{tmp_path}/bin:{os.environ['PATH']}",
        "SLURM_JOB_NODELIST": "localhost",
        "SLURM_NTASKS": "2",
        "SLURM_JOB_ID": "7",
        "XLA_FLAGS": "--xla_dump_to=/tmp/x",
    }
    out = subprocess.run(
        ["bash", str(script)], env=env, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out[0] == "cpu|--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=2"
    assert out[-3:] == [
        "--coordinator_address=localhost:5000",
        "--num_processes=2",
        "--process_id=1",
    ]
    del env["XLA_FLAGS"]
    out = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True).stdout
    assert out.splitlines()[0] == "cpu|--xla_force_host_platform_device_count=2"


def test_slurm_submit_command():
    assert launch_commands.slurm_submit_command("logs/x.sbatch") == ["sbatch", "logs/x.sbatch"]
    assert launch_commands.slurm_submit_command("x", wait=True) == ["sbatch", "--wait", "x"]


# Validation.


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: layout(0, 8), "nodes must be >= 1"),
        (lambda: layout(1, -1), "gpus_per_node must be >= 0"),
        (lambda: layout(1, 8, "core"), "'gpu' or 'node'"),
        (lambda: layout(1, 8, 4), "a number of processes per node is for CPU nodes"),
        (lambda: layout(1, 0, "gpu"), "needs GPUs"),
        (lambda: layout(1, 0, 0), "a number >= 1"),
        (lambda: layout(1, 0, "core"), "a number >= 1"),
        (lambda: layout(1, 8, cpu_devices_per_process=2), "are for CPU nodes"),
        (lambda: layout(1, 8, cpus_per_process=2), "are for CPU nodes"),
        (lambda: layout(1, 8, cpus_per_gpu=0), "cpus_per_gpu must be >= 1"),
        (lambda: layout(1, 0, cpus_per_process=0), "cpus_per_process must be >= 1"),
        (lambda: layout(1, 0, 2, cpu_devices_per_process=0), "cpu_devices_per_process must be"),
        (lambda: launch_commands.slurm_script("my job", layout(), TRAIN_ARGS), "job name"),
        (lambda: launch_commands.slurm_script("j", layout(), TRAIN_ARGS[1:]), "--config="),
        (
            lambda: launch_commands.slurm_script("j", layout(), TRAIN_ARGS + ["--process_id=3"]),
            "--process_id",
        ),
        (
            lambda: launch_commands.slurm_script(
                "j", layout(), TRAIN_ARGS, extra_sbatch=["account=x"]
            ),
            "sbatch",
        ),
        (lambda: launch_commands.tpu_pod_command("", "z", None, TRAIN_ARGS), "TPU name"),
        (lambda: launch_commands.tpu_pod_command("t", " ", None, TRAIN_ARGS), "zone"),
        (lambda: launch_commands.tpu_pod_command("t", "z", None, TRAIN_ARGS[:1]), "--workdir="),
        (
            lambda: launch_commands.tpu_pod_command("t", "z", None, ["--config=", "--workdir=w"]),
            "--config=",
        ),
    ],
)
def test_invalid_arguments_are_clear_errors(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_split_train_args_at_the_first_double_dash():
    assert launch_commands.split_train_args(["--tpu=t", "--", "--config=c", "--", "x"]) == (
        ["--tpu=t"],
        ["--config=c", "--", "x"],
    )
    assert launch_commands.split_train_args(["--tpu=t"]) == (["--tpu=t"], [])


# CLIs.


@pytest.fixture
def recording_path(tmp_path) -> tuple[str, pathlib.Path]:
    """A PATH whose gcloud and sbatch only record their arguments, one call per line."""
    calls = tmp_path / "calls.txt"
    for name in ("gcloud", "sbatch"):
        fake_tool(tmp_path / "bin", name, f'echo "{name} $*" >> "{calls}"\n')
    return f"{tmp_path}/bin:{os.environ['PATH']}", calls


def test_slurm_dry_run_prints_script_and_command_and_writes_nothing(tmp_path, recording_path):
    path, calls = recording_path
    script_out = tmp_path / "out" / "job.sbatch"
    result = run_cli(
        "launch_slurm.py",
        [
            "--job_name=drytest_job",
            "--nodes=2",
            "--gpus_per_node=8",
            f"--script_out={script_out}",
            "--dry-run",
            "--",
            *TRAIN_ARGS,
        ],
        path,
    )
    assert result.returncode == 0, result.stderr
    expected = launch_commands.slurm_script("drytest_job", layout(2, 8), TRAIN_ARGS)
    assert result.stdout == expected + shlex.join(["sbatch", str(script_out)]) + "\n"
    assert not calls.exists() and not script_out.parent.exists()
    assert not (ROOT / "logs" / "drytest_job.sbatch").exists()


def test_tpu_dry_run_prints_commands_and_runs_nothing(recording_path):
    path, calls = recording_path
    result = run_cli(
        "launch_tpu.py",
        [
            "--tpu=my-v4-32",
            "--zone=us-central2-b",
            "--sync",
            "--setup",
            "--dry-run",
            "--",
            *TRAIN_ARGS,
        ],
        path,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 4  # mkdir, scp, setup, train
    assert shlex.split(lines[-1]) == launch_commands.tpu_pod_command(
        "my-v4-32", "us-central2-b", None, TRAIN_ARGS
    )
    assert all("--worker=all" in line for line in lines)
    assert not calls.exists()


@pytest.mark.parametrize(
    "tool, args, missing",
    [
        ("launch_slurm.py", ["--job_name=j", "--nodes=1", "--gpus_per_node=1"], "sbatch"),
        ("launch_tpu.py", ["--tpu=t", "--zone=z"], "gcloud"),
    ],
)
def test_missing_cluster_tool_is_a_clear_error(tmp_path, tool, args, missing):
    (tmp_path / "empty").mkdir()
    result = run_cli(tool, [*args, "--", *TRAIN_ARGS], str(tmp_path / "empty"), cwd=tmp_path)
    assert result.returncode == 2
    assert f"`{missing}` is not on PATH" in result.stderr and "--dry-run" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "logs").exists()


def test_cli_argument_errors_have_no_traceback(recording_path):
    path, calls = recording_path
    result = run_cli(
        "launch_slurm.py",
        ["--job_name=j", "--nodes=0", "--gpus_per_node=8", "--dry-run", "--", *TRAIN_ARGS],
        path,
    )
    assert result.returncode == 2 and "nodes must be >= 1" in result.stderr
    result = run_cli("launch_tpu.py", ["--tpu=t", "--zone=z", "--", "--config=c"], path)
    assert result.returncode == 2 and "--workdir=" in result.stderr
    assert "Traceback" not in result.stderr and not calls.exists()


def test_slurm_submit_writes_the_script_and_calls_sbatch(tmp_path, recording_path):
    path, calls = recording_path
    result = run_cli(
        "launch_slurm.py",
        ["--job_name=sst2", "--nodes=2", "--gpus_per_node=8", "--", *TRAIN_ARGS],
        path,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert calls.read_text() == "sbatch logs/sst2.sbatch\n"
    assert (tmp_path / "logs/sst2.sbatch").read_text() == launch_commands.slurm_script(
        "sst2", layout(2, 8), TRAIN_ARGS
    )


def test_slurm_cli_submits_cpu_jobs_and_waits(tmp_path, recording_path):
    path, calls = recording_path
    args = ["--job_name=cpu", "--nodes=1", "--gpus_per_node=0", "--processes_per_node=2"]
    args += ["--cpu_devices_per_process=2", "--wait", "--", *TRAIN_ARGS]
    result = run_cli("launch_slurm.py", args, path, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert calls.read_text() == "sbatch --wait logs/cpu.sbatch\n"
    assert (tmp_path / "logs/cpu.sbatch").read_text() == launch_commands.slurm_script(
        "cpu", layout(1, 0, 2, cpu_devices_per_process=2), TRAIN_ARGS
    )
    # CPU nodes' defaults: one process per node, one CPU device each.
    result = run_cli(
        "launch_slurm.py",
        ["--job_name=c", "--nodes=2", "--gpus_per_node=0", "--dry-run", "--", *TRAIN_ARGS],
        path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(launch_commands.slurm_script("c", layout(2, 0), TRAIN_ARGS))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--gpus_per_node=0", "--processes_per_node=gpu"], "needs GPUs"),
        (["--gpus_per_node=-1"], "gpus_per_node must be >= 0"),
        (["--gpus_per_node=8", "--processes_per_node=2"], "for CPU nodes"),
        (["--gpus_per_node=8", "--cpu_devices_per_process=4"], "for CPU nodes"),
        (["--gpus_per_node=0", "--processes_per_node=core"], "a number >= 1"),
    ],
)
def test_slurm_cli_node_kind_errors(recording_path, args, message):
    path, calls = recording_path
    result = run_cli(
        "launch_slurm.py",
        ["--job_name=j", "--nodes=1", *args, "--dry-run", "--", *TRAIN_ARGS],
        path,
    )
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not calls.exists()


def test_tpu_launch_runs_the_gcloud_commands_in_order(recording_path):
    path, calls = recording_path
    result = run_cli("launch_tpu.py", ["--tpu=t", "--zone=z", "--setup", "--", *TRAIN_ARGS], path)
    assert result.returncode == 0, result.stderr
    recorded = calls.read_text().splitlines()
    assert len(recorded) == 2
    assert "tools/install.sh" in recorded[0] and "finetune_jax.train" in recorded[1]
