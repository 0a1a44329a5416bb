"""The open log window: running sums of the per-step scalar metrics since the last logged
step, kept with every checkpoint so that a run stopped mid-window (preemption, Ctrl-C) and
resumed logs exactly what an uninterrupted run logs.

The sums are float64, added one step at a time in step order, so a window split by a
checkpoint (saved as JSON, which round-trips a float64 exactly) and continued adds the same
numbers in the same order as an unsplit one: the logged means are bitwise equal.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

# Step metrics that are the value at a step, not a quantity to average over the window:
# the lr logged (and shown on the bar) at step s is the lr step s used.
POINT_VALUES = frozenset({"lr"})
# Step metrics that are counts: logged as their sum over the window.
COUNTS = frozenset({"skipped"})


@dataclasses.dataclass
class LogWindow:
    """The steps seen since the last log record: how many, each scalar's sum, and the
    latest step's values (for POINT_VALUES)."""

    steps: int = 0
    sums: dict[str, float] = dataclasses.field(default_factory=dict)
    last: dict[str, float] = dataclasses.field(default_factory=dict)

    def add(self, metrics: dict[str, Any]) -> None:
        """One step's host metrics; non-scalar ones (per-param flags) are not logged."""
        for name, value in metrics.items():
            if np.ndim(value) != 0:
                continue
            self.sums[name] = self.sums.get(name, 0.0) + float(value)
            self.last[name] = float(value)
        self.steps += 1

    def values(self) -> dict[str, float]:
        """What the log records for the window: means, COUNTS' sums, POINT_VALUES' last."""
        out = {}
        for name, total in self.sums.items():
            if name in POINT_VALUES:
                out[name] = self.last[name]
            elif name in COUNTS:
                out[name] = total
            else:
                out[name] = total / self.steps
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, for the checkpoint's progress item."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, saved: dict[str, Any] | None) -> LogWindow:
        """The window a checkpoint saved; an empty one for None (a fresh run, or a
        checkpoint written before windows were saved)."""
        if not saved:
            return cls()
        return cls(int(saved["steps"]), dict(saved["sums"]), dict(saved["last"]))
