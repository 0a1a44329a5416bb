"""Multi-host start-up: one JAX process per host (or per GPU), one global mesh.

`jax.distributed.initialize` autodetects Cloud TPU pods and SLURM jobs; elsewhere the
coordinator address, process count and process id are passed explicitly.
"""

from __future__ import annotations

import os

import jax


def cluster_detected() -> bool:
    """True when the environment says this process is one of several (SLURM, TPU pod)."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return True
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return len([h for h in hosts.split(",") if h]) > 1


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    cpu_collectives: str = "gloo",
) -> bool:
    """Join the multi-process runtime if asked to (explicit flags) or if a cluster is detected.

    Returns whether `jax.distributed.initialize` was called. On CPU the collectives backend
    must be chosen before the backend starts (gloo works between processes on one machine).
    """
    given = [v is not None for v in (coordinator_address, num_processes, process_id)]
    if any(given) and not all(given):
        raise ValueError(
            "give all of --coordinator_address, --num_processes and --process_id, "
            "or none of them (to autodetect a TPU pod or SLURM job)"
        )
    if not all(given) and not cluster_detected():
        return False
    if cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    if coordinator_address is None:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
        )
    return True


def define_flags() -> dict:
    """The --coordinator_address / --num_processes / --process_id flags of an entry point."""
    from absl import flags  # noqa: PLC0415

    return {
        "coordinator_address": flags.DEFINE_string(
            "coordinator_address", None, "host:port of process 0 (multi-host without autodetect)"
        ),
        "num_processes": flags.DEFINE_integer("num_processes", None, "Total number of processes."),
        "process_id": flags.DEFINE_integer("process_id", None, "This process's index."),
    }


def initialize_from_flags(values: dict) -> bool:
    """`initialize` with the values of the flags from `define_flags`."""
    return initialize(**{k: v.value for k, v in values.items()})
