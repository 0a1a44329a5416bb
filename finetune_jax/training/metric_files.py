"""Metrics to `<workdir>/metrics.jsonl` and TensorBoard event files; process 0 only."""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax


class MetricWriter:
    """Appends one JSON object per (step, kind) and mirrors scalars to TensorBoard."""

    def __init__(self, workdir: str, enabled: bool | None = None, resume_step: int = 0):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._jsonl = None
        self._tb = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            _drop_records_after(os.path.join(workdir, "metrics.jsonl"), resume_step)
            # Append: a resumed run continues the same log rather than overwriting it.
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
            from tensorboardX import SummaryWriter  # noqa: PLC0415 (heavy import, process 0 only)

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, kind: str, metrics: dict[str, Any]) -> None:
        """Record `metrics` (scalars) under `kind` (e.g. 'train', 'eval')."""
        if not self.enabled:
            return
        values = {k: _scalar(v) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": step, "kind": kind, **values}) + "\n")
        self._jsonl.flush()
        for name, value in values.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self._tb.add_scalar(f"{kind}/{name}", value, step)

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


def _scalar(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    return value


def _drop_records_after(path: str, step: int) -> None:
    """On resume, forget records of steps after the checkpoint: they will be logged again."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError):
            continue  # a line cut short by a crash
    if len(keep) != len(lines):
        with open(path + ".tmp", "w") as f:
            f.writelines(keep)
        os.replace(path + ".tmp", path)
