"""A progress bar on process 0 (tqdm), silent elsewhere; with the bar off
(`train.progress=False`, e.g. a log file), the same metrics as one plain line per log step."""

from __future__ import annotations

from typing import Any

import jax
from tqdm import tqdm


class Progress:
    """Steps done out of the run's end step, with the latest logged metrics."""

    def __init__(self, start: int, end: int, enabled: bool = True):
        self.enabled = enabled and jax.process_index() == 0
        self._bar = (
            tqdm(total=end, initial=start, unit="step", dynamic_ncols=True)
            if self.enabled
            else None
        )

    def update(self, step: int, metrics: dict[str, Any]) -> None:
        shown = {k: f"{v:.4g}" for k, v in metrics.items()}
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix(shown, refresh=True)
        elif jax.process_index() == 0:
            print(f"step {step}: " + " ".join(f"{k}={v}" for k, v in shown.items()), flush=True)

    def log(self, message: str) -> None:
        """A line printed above the bar (eval results, early stopping)."""
        if self._bar is not None:
            self._bar.write(message)
        elif jax.process_index() == 0:
            print(message, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
