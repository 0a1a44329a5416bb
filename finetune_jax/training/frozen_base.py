"""What a slim checkpoint records about the frozen params it leaves out, and the check that
the params streamed from the source again (resume, eval, export, predict) are the ones the
run trained on.

A run with frozen params (LoRA and the other PEFT methods, linear probes, BitFit, ...)
checkpoints only what trains unless `train.checkpoint_frozen` is set; see `Setup` for the
restore. The record names the source and, per frozen param, its shape, dtype and a 64-bit
checksum of its values as loaded; its digest goes into `manifest.json` too.

Why checksums of the loaded values rather than a hash of the source files: they are what
the run computes with, so they change if any element of a frozen param changes, whether
through the source file, its converter, a re-quantization or an init drawn differently
(frozen params born from the seed have no file). They are computed on the devices over
each param's own shards with exact (wrapping) integer sums, so every mesh and process count
gives the same value, at the cost of one pass over device memory: no host pass of sha256
over a 140 GB base (~1.5 GB/s per core). They detect accidental change, not tampering.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from finetune_jax.training.checkpoints import CheckpointError
from finetune_jax.training.element_index import flat_index

_MIX = 0x9E3779B1  # Knuth's multiplicative hash constant: spreads positions over 32 bits


class SourceChangedError(CheckpointError):
    """The frozen params streamed from the source differ from those the run trained on."""


def record(source: str, values: Mapping[str, jax.Array]) -> dict[str, Any]:
    """The record of the frozen params `values` ({path: array}) loaded from `source`."""
    leaves = {
        path: {"shape": list(value.shape), "dtype": str(value.dtype), "checksum": checksum(value)}
        for path, value in sorted(values.items())
    }
    return {"source": source, "digest": digest(leaves), "leaves": leaves}


def digest(leaves: Mapping[str, Mapping[str, Any]]) -> str:
    """One hex digest over the per-param records (sha256 of their lines, first 16 digits)."""
    lines = "".join(
        f"{path} {tuple(leaf['shape'])} {leaf['dtype']} {leaf['checksum']}\n"
        for path, leaf in sorted(leaves.items())
    )
    return hashlib.sha256(lines.encode()).hexdigest()[:16]


def check_source(
    saved: Mapping[str, Any], values: Mapping[str, jax.Array], source: str, where: str
):
    """Raise a SourceChangedError naming both digests, the source and the first changed
    param unless `values` (streamed from `source`) are the frozen params `saved` records."""
    now = record(source, values)
    if now["digest"] == saved["digest"]:
        return
    changed = [p for p, leaf in saved["leaves"].items() if now["leaves"].get(p) != leaf]
    raise SourceChangedError(
        f"{where} holds only the trained params; its frozen ones were loaded from "
        f"{saved['source']} (digest {saved['digest']}), but {source} now gives digest "
        f"{now['digest']} (first changed param: {changed[0]!r}). Restore the original weights "
        f"at {saved['source']}, or point model.name at a copy of them (model.param_dtype and "
        "the loading code must be as they were too). The checkpoint is intact."
    )


def checksum(value: jax.Array) -> str:
    """16 hex digits: two wrapping uint32 sums over the value's bits, computed where it lives."""
    sharding = value.sharding
    if isinstance(sharding, jax.sharding.NamedSharding):  # the result on every device
        sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    first, second = jax.device_get(_checksum_fn(sharding)(value))
    return f"{int(first):08x}{int(second):08x}"


@functools.cache
def _checksum_fn(out_sharding: jax.sharding.Sharding):
    return jax.jit(_sums, out_shardings=out_sharding)


def _sums(x: jax.Array) -> jax.Array:
    """Sums of the bits weighted by an odd number per position (a changed element changes
    both); the second mixes the position into the bits too (two swapped elements change it)."""
    if jnp.issubdtype(x.dtype, jnp.floating):  # bf16, f16, fp8 widen to f32 exactly
        bits = lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    else:  # integers (quantized weights) and bools: exact
        bits = x.astype(jnp.uint32)
    index = flat_index(x.shape)
    mixed = index * jnp.uint32(_MIX)
    first = jnp.sum(bits * (index * 2 + 1), dtype=jnp.uint32)
    second = jnp.sum((bits ^ mixed) * (mixed | 1), dtype=jnp.uint32)
    return jnp.stack([first, second])
