"""FLOPs of one train step, counted right when the layers are scanned.

XLA's cost analysis counts a while loop's body once, so with `model.scan_layers=True` it
reports one layer's FLOPs for the whole stack (a DINOv2-S step at batch 16: 13 of 140
GFLOP; a scanned Llama-3-8B: about a 30th). For a scanned config the step of its unrolled
twin is lowered (never compiled: seconds, even for 80 layers; no weights, tokenizer or data
are read) and that HLO is costed: the whole step's FLOPs, divided evenly over the devices.
"""

from __future__ import annotations

from typing import Any

import jax

from finetune_jax.training import builder


def xla_flops(stage: Any) -> float:
    """FLOPs XLA's cost analysis gives a lowered or compiled program (nan if none)."""
    cost = stage.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float((cost or {}).get("flops", float("nan")))


class StepFlops:
    """`flops(step, batch)`: FLOPs per device of one train step on a batch of `batch`'s
    shapes (arrays or ShapeDtypeStructs). `step` is the step lowered or compiled for that
    batch. Unrolled configs: the compiled program's own count (a lowered step is compiled
    for it). Scanned ones: the unrolled twin's lowered step over `jax.device_count()`; `step`
    is not compiled for it."""

    def __init__(self, config, hf_config: dict[str, Any]):
        self._twin = None
        if config.model.scan_layers:
            twin = config.copy_and_resolve_references()
            twin.unlock()
            twin.model.scan_layers = False
            self._twin = builder.build(twin, hf_config=hf_config)

    def __call__(self, step: jax.stages.Lowered | jax.stages.Compiled, batch: dict) -> float:
        twin = self._twin
        if twin is None:
            return xla_flops(step.compile() if isinstance(step, jax.stages.Lowered) else step)
        shapes = {
            name: jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=twin.batch_sharding)
            for name, value in batch.items()
        }
        lowered = twin.train_step.lower(twin.abstract_state(), shapes)
        return xla_flops(lowered) / jax.device_count()
