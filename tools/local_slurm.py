"""A one-node SLURM cluster on this machine, for trying tools/launch_slurm.py for real.

  python tools/local_slurm.py --dir=/tmp/slurm [--cpus=2]

starts munged, slurmctld and slurmd (Debian: `apt-get install -y slurm-wlm munge`) as the
current user, which must be root (slurmd starts jobs as their submitter), with every file —
munge key, slurm.conf, state, spool, logs — under --dir (munged's socket alone in a fresh
/tmp/local-slurm-* dir: munged wants every dir above it open to all), all traffic on loopback
and free ports; waits until the node `localhost` takes jobs, prints the `export SLURM_CONF=...`
that points sbatch / squeue / scontrol at it, and stops the daemons on Ctrl-C. Then, in
another shell:

  export SLURM_CONF=/tmp/slurm/slurm.conf
  python tools/launch_slurm.py --job_name=try --nodes=1 --gpus_per_node=0 \\
      --processes_per_node=2 --cpu_devices_per_process=2 --venv= --wait -- \\
      --config=configs/glue/sst2_minilm.py --config.train.max_steps=20 --workdir=runs/try

tests/test_slurm_cluster.py starts and stops the same cluster through `LocalSlurm`.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "sinfo", "scancel", "srun")
INSTALL = "apt-get install -y slurm-wlm munge"
# The node's name is what `scontrol show hostnames` gives the job, and so the address every
# JAX process dials for the coordinator: it must resolve, and to loopback.
NODE = "localhost"


def missing_programs() -> list[str]:
    """The daemons and clients this needs that are not installed (their sbin dirs included)."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return [p for p in (*DAEMONS, *CLIENTS) if shutil.which(p, path=path) is None]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_conf(root: Path, cpus: int, munge_socket: Path) -> str:
    """A minimal slurm.conf: one node of `cpus` CPUs, no cgroups, no accounting, root's jobs."""
    user = "root"
    return "\n".join(
        [
            "ClusterName=local",
            f"SlurmctldHost={NODE}(127.0.0.1)",
            f"SlurmctldPort={free_port()}",
            f"SlurmdPort={free_port()}",
            f"SlurmUser={user}",
            f"SlurmdUser={user}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={munge_socket}",
            f"StateSaveLocation={root / 'state'}",
            f"SlurmdSpoolDir={root / 'spool'}",
            f"SlurmctldPidFile={root / 'slurmctld.pid'}",
            f"SlurmdPidFile={root / 'slurmd.pid'}",
            # No cgroups here (a container may not have them): plain process tracking.
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "SchedulerType=sched/backfill",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "ReturnToService=2",
            # Trust the node line below whatever this machine's real core count is.
            "SlurmdParameters=config_overrides",
            "InactiveLimit=0",
            "KillWait=5",
            "MinJobAge=600",
            f"NodeName={NODE} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN",
            "PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
            "",
        ]
    )


class LocalSlurm:
    """munged + slurmctld + slurmd under `root`; `start()`, then `env` for the clients, `stop()`."""

    def __init__(self, root: str | os.PathLike, cpus: int = 2):
        self.root = Path(root).resolve()
        self.cpus = cpus
        self.conf = self.root / "slurm.conf"
        self.munge_socket: Path | None = None  # made by write_files()
        self.procs: dict[str, subprocess.Popen] = {}  # by program, in start order
        path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
        self.env = {**os.environ, "PATH": path, "SLURM_CONF": str(self.conf)}

    def write_files(self) -> None:
        for sub in ("munge", "state", "spool"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (self.root / "munge").chmod(0o700)
        # munged refuses a socket below a dir that not all may enter (pytest's tmp dirs are
        # 0700), and a socket's path must be short (108 bytes).
        socket_dir = Path(tempfile.mkdtemp(prefix="local-slurm-"))
        socket_dir.chmod(0o755)
        self.munge_socket = socket_dir / "munge.socket"
        key = self.root / "munge" / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o600)
        self.conf.write_text(slurm_conf(self.root, self.cpus, self.munge_socket))

    def _daemon(self, argv: list[str], log: str) -> None:
        out = open(self.root / log, "ab")  # noqa: SIM115 - the daemon writes it until stop()
        self.procs[argv[0]] = subprocess.Popen(
            argv, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        out.close()

    def start(self, timeout: float = 60) -> None:
        """Start the three daemons in the foreground (children of this process) and wait until
        the node takes jobs; on failure stop what started and raise with the logs' tails."""
        if os.geteuid() != 0:
            raise RuntimeError("a local SLURM cluster runs its daemons as root")
        missing = missing_programs()
        if missing:
            raise RuntimeError(f"not installed: {', '.join(missing)} (Debian: {INSTALL})")
        self.write_files()
        munge = self.root / "munge"
        try:
            self._daemon(
                [
                    "munged",
                    "--foreground",
                    f"--socket={self.munge_socket}",
                    f"--key-file={munge / 'munge.key'}",
                    f"--pid-file={munge / 'munged.pid'}",
                    f"--seed-file={munge / 'munged.seed'}",
                    "--log-file=/dev/null",  # it logs to stderr too: DIR/munged.log
                ],
                "munged.log",
            )
            self._wait(lambda: self.munge_socket.exists(), timeout, "munged's socket")
            # -D: foreground; -c: forget jobs an earlier cluster in this dir left.
            self._daemon(["slurmctld", "-D", "-c"], "slurmctld.log")
            self._daemon(["slurmd", "-D", "-N", NODE], "slurmd.log")
            self._wait(self.node_idle, timeout, f"node {NODE} to be idle")
        except BaseException:
            self.stop()
            raise

    def node_idle(self) -> bool:
        out = self.client(["sinfo", "-h", "-n", NODE, "-o", "%t"], check=False).stdout
        return out.strip() == "idle"

    def client(self, argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
        """Run a SLURM client (sbatch, squeue, scontrol, sinfo) against this cluster."""
        return subprocess.run(
            argv, env=self.env, capture_output=True, text=True, check=check, timeout=30
        )

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [name for name, p in self.procs.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                why = f"{', '.join(dead)} exited" if dead else f"no {what} after {timeout:.0f} s"
                raise RuntimeError(f"local SLURM cluster did not start: {why}\n{self.log_tails()}")
            time.sleep(0.5)

    def log_tails(self, lines: int = 15) -> str:
        parts = []
        for log in sorted(self.root.glob("*.log")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {log}\n" + "\n".join(text))
        return "\n".join(parts)

    def cancel_jobs(self, timeout: float = 30) -> None:
        """Cancel every job still queued or running and wait until they are gone: a job's
        processes belong to slurmstepd, not to slurmd, and would outlive the daemons."""
        slurmctld = self.procs.get("slurmctld")
        if slurmctld is None or slurmctld.poll() is not None:
            return  # slurmctld is not running: nothing can have been submitted
        deadline = time.monotonic() + timeout
        try:
            jobs = self.client(["squeue", "-h", "-o", "%i"], check=False).stdout.split()
            if jobs:
                self.client(["scancel", *jobs], check=False)
            while jobs and time.monotonic() < deadline:
                time.sleep(0.5)
                jobs = self.client(["squeue", "-h", "-o", "%i"], check=False).stdout.split()
        except subprocess.TimeoutExpired:
            pass  # slurmctld hangs: stopping the daemons is all that is left

    def stop(self, timeout: float = 20) -> None:
        """Cancel the jobs left, then stop the daemons, the last started first (SIGTERM, then
        SIGKILL after `timeout`)."""
        self.cancel_jobs()
        for proc in reversed(self.procs.values()):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs = {}
        if self.munge_socket is not None:
            shutil.rmtree(self.munge_socket.parent, ignore_errors=True)
            self.munge_socket = None

    def __enter__(self) -> LocalSlurm:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tools/local_slurm.py", description=__doc__)
    parser.add_argument("--dir", required=True, help="where every file of the cluster goes")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the node (default 2)")
    args = parser.parse_args(argv)
    cluster = LocalSlurm(args.dir, args.cpus)
    try:
        cluster.start()
    except RuntimeError as e:
        parser.exit(1, f"error: {e}\n")
    print(f"SLURM is up (node {NODE}, {args.cpus} CPUs); in another shell:", flush=True)
    print(f"export SLURM_CONF={cluster.conf}", flush=True)
    print("Ctrl-C stops it.", flush=True)
    try:
        # Blocked only now: the daemons would inherit the mask.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
