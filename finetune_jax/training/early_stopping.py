"""Early stopping and best-checkpoint bookkeeping on one eval metric."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from finetune_jax.evaluation.metrics import metric_mode


@dataclasses.dataclass
class EarlyStopping:
    """Tracks the best value of one eval metric; stops after `patience` evals without gain."""

    metric: str
    patience: int = 0  # 0: never stop early
    best: float | None = None
    best_step: int | None = None
    bad_evals: int = 0

    def update(self, value: float, step: int) -> bool:
        """Record an eval result; True if it is a new best."""
        sign = -1.0 if metric_mode(self.metric) == "min" else 1.0
        improved = math.isfinite(value) and (self.best is None or sign * value > sign * self.best)
        if improved:
            self.best, self.best_step, self.bad_evals = value, step, 0
        else:
            self.bad_evals += 1
        return improved

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_evals >= self.patience

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EarlyStopping:
        return cls(**d)
