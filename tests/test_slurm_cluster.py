"""tools/launch_slurm.py against a real one-node SLURM cluster (tools/local_slurm.py: munged,
slurmctld and slurmd as root, on loopback, every file under tmp_path): a two-task CPU job with
two fake CPU devices per process trains the tiny BERT as one 4-device mesh over two processes
and leaves its summary and checkpoints. Skipped where SLURM is not installed
(`apt-get install -y slurm-wlm munge`) or not run as root."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

from tests.helpers import REPO, final_state, tiny_config

pytestmark = pytest.mark.slow

spec = importlib.util.spec_from_file_location("local_slurm", REPO / "tools" / "local_slurm.py")
local_slurm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(local_slurm)


def skip_reason() -> str | None:
    missing = local_slurm.missing_programs()
    if missing:
        return f"SLURM is not installed (no {', '.join(missing)}): {local_slurm.INSTALL}"
    if os.geteuid() != 0:
        return "the local SLURM cluster runs munged, slurmctld and slurmd as root"
    return None


@pytest.fixture
def slurm(tmp_path):
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    cluster = local_slurm.LocalSlurm(tmp_path / "slurm", cpus=2)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def test_launcher_runs_a_two_process_cpu_job(slurm, tiny_bert_dir, sst2_slice, tmp_path):
    config_file, workdir = tmp_path / "tiny.py", tmp_path / "run"
    config_file.write_text(
        "from tests.helpers import tiny_config\n\n\n"
        f"def get_config():\n    return tiny_config({str(tiny_bert_dir)!r}, {str(sst2_slice)!r})\n"
    )
    env = {k: v for k, v in slurm.env.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    # The job inherits this environment (sbatch --export=ALL): `python` is this interpreter.
    env["PATH"] = f"{os.path.dirname(sys.executable)}{os.pathsep}{env['PATH']}"
    launch = [
        sys.executable,
        str(REPO / "tools" / "launch_slurm.py"),
        "--job_name=tiny_cpu",
        "--nodes=1",
        "--gpus_per_node=0",
        "--processes_per_node=2",
        "--cpu_devices_per_process=2",
        f"--repo_dir={REPO}",
        "--venv=",
        "--time=10:00",
        "--wait",
        "--",
        f"--config={config_file}",
        f"--workdir={workdir}",
    ]
    result = subprocess.run(
        launch, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    job_id = re.search(r"Submitted batch job (\d+)", result.stdout)
    log = tmp_path / "logs" / f"tiny_cpu-{job_id.group(1)}.out" if job_id else None
    job_output = log.read_text() if log and log.exists() else "(no job log)"
    assert result.returncode == 0, (
        f"{result.stdout}\n{result.stderr}\n{job_output[-6000:]}\n{slurm.log_tails()}"
    )
    job = slurm.client(["scontrol", "show", "job", job_id.group(1)]).stdout
    assert "JobState=COMPLETED" in job and "ExitCode=0:0" in job, job

    # One mesh of 4 devices over 2 processes, started by SLURM's two tasks.
    (start,) = json.loads((workdir / "manifest.json").read_text())["starts"]
    assert start["devices"]["process_count"] == 2
    assert start["devices"]["local_device_count"] == 2
    assert start["devices"]["mesh_shape"]["data"] == 4
    assert "--num_processes=2" in start["command"]
    assert "mesh {'data': 4" in job_output

    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["final_step"] == 6 and summary["stopped_by"] is None
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [3, 6]
    state = final_state(tiny_config(tiny_bert_dir, sst2_slice), workdir)
    assert int(state.step) == 6
