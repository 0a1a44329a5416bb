"""The run manifest: what code, packages, machine and command produced a workdir.

`write_manifest` runs at every start of a run (first start and each resume) and appends one
record to `<workdir>/manifest.json` (`{"starts": [oldest, ..., newest]}`), so a run resumed on
other hardware or at another commit keeps the record of both.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import socket
import subprocess
import sys
from collections.abc import Sequence
from importlib import metadata
from typing import Any

import jax
import ml_collections

from finetune_jax.training import workdir_files

MANIFEST = "manifest.json"
# Distribution names (as pip knows them) whose versions decide what a run computes.
PACKAGES = (
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "orbax-checkpoint",
    "transformers",
    "datasets",
    "numpy",
    "ml-collections",
    "tokenizers",
    "safetensors",
)
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def package_versions(names: Sequence[str] = PACKAGES) -> dict[str, str | None]:
    """Installed version of each distribution (None when not installed), plus python's."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["python"] = platform.python_version()
    return versions


def _git(args: Sequence[str], cwd: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_state(path: str = _PACKAGE_DIR) -> dict[str, Any]:
    """Commit and dirty flag of the git checkout holding `path` (the package by default).

    All values are None when `path` is not tracked by git (an installed wheel, a copy), so an
    unrelated repository that merely contains a site-packages dir is not reported. `dirty`
    follows `git describe --dirty`: modified tracked files count, untracked files do not.
    """
    none = {"commit": None, "dirty": None, "root": None}
    root = _git(["rev-parse", "--show-toplevel"], path)
    if root is None or _git(["ls-files", "--error-unmatch", "--", path], path) is None:
        return none
    commit = _git(["rev-parse", "HEAD"], path)
    status = _git(["status", "--porcelain", "--untracked-files=no"], path)
    return {"commit": commit, "dirty": None if status is None else bool(status), "root": root}


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host_info() -> dict[str, Any]:
    """Hostname, CPU model and count, OS: the machine a run's timings belong to."""
    return {
        "hostname": socket.gethostname(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
    }


def device_info(mesh: jax.sharding.Mesh | None) -> dict[str, Any]:
    """Backend, device kind and counts (global and this process's), processes, mesh shape."""
    devices = jax.devices()
    return {
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
        "process_count": jax.process_count(),
        "mesh_shape": None if mesh is None else {k: int(v) for k, v in mesh.shape.items()},
    }


def collect(
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh | None,
    argv: Sequence[str] | None = None,
    frozen_base: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One manifest record for a start of the run now, on this machine. `frozen_base`: the
    record of the frozen params its slim checkpoints leave out (source, digest)."""
    env = {k: os.environ[k] for k in ("XLA_FLAGS", "CUDA_VISIBLE_DEVICES") if k in os.environ}
    frozen = None
    if frozen_base is not None:
        frozen = {
            "source": frozen_base["source"],
            "digest": frozen_base["digest"],
            "params": len(frozen_base["leaves"]),
        }
    return {
        "start_time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
        "command": list(sys.argv if argv is None else argv),
        "cwd": os.getcwd(),
        "git": git_state(),
        "packages": package_versions(),
        "host": host_info(),
        "devices": device_info(mesh),
        "environment": env,
        "config": json.loads(json.dumps(config.to_dict(), sort_keys=True, default=str)),
        "frozen_base": frozen,
    }


def read_manifest(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """The manifest records of a workdir, oldest first ([] when there is none)."""
    manifest = workdir_files.read_json(workdir_files.workdir_path(workdir) / MANIFEST)
    return [] if manifest is None else manifest["starts"]


def write_manifest(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    mesh: jax.sharding.Mesh | None,
    argv: Sequence[str] | None = None,
    frozen_base: dict[str, Any] | None = None,
) -> str:
    """Append this start's record to `<workdir>/manifest.json` (process 0 only, atomically).

    `argv` defaults to `sys.argv`; `frozen_base` as in `collect`. Returns the manifest's path.
    """
    path = workdir_files.workdir_path(workdir) / MANIFEST
    if jax.process_index() == 0:
        starts = [*read_manifest(workdir), collect(config, mesh, argv, frozen_base)]
        path.parent.mkdir(parents=True, exist_ok=True)
        workdir_files.write_text_atomic(path, workdir_files.json_text({"starts": starts}, indent=2))
    return os.fspath(path)
