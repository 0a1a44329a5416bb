"""The training run's progress on process 0, silent elsewhere: on a terminal a tqdm bar (the
loss and lr beside it, every other line printed above it); in a log file (stderr not a
terminal) or with `train.progress=False`, one plain line of the train metrics per log step."""

from __future__ import annotations

import contextlib
import time
from typing import Any

from tqdm import tqdm

from finetune_jax import progress

# What the bar shows beside the steps: the rest (grad_norm, ...) is in the log lines,
# metrics.jsonl and TensorBoard; the bar keeps room to be a bar at 80 columns.
ON_BAR = ("loss", "lr")


class Progress:
    """Steps done out of the run's end step, with the latest logged metrics."""

    def __init__(self, start: int, end: int, enabled: bool = True):
        """`enabled`: a bar where stderr is a terminal (plain lines elsewhere); False: plain
        lines always."""
        self.shown = progress.shown()
        self.start, self.end = start, end
        self._t0 = time.monotonic()
        self._bar = None
        self._routing = contextlib.ExitStack()
        if enabled and self.shown and progress.on_terminal():
            self._routing.enter_context(progress.printing_above_bars())
            self._bar = tqdm(
                total=end,
                initial=start,
                unit="step",
                dynamic_ncols=True,
                file=progress.terminal_stream(),
            )

    def update(self, step: int, metrics: dict[str, Any]) -> None:
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix_str(bar_postfix(metrics), refresh=True)
        elif self.shown:
            print(self.line(step, metrics), flush=True)

    def line(self, step: int, metrics: dict[str, Any]) -> str:
        """The plain line of a log step: 'step 20: loss=... lr=... [20/300 00:13<03:02]'."""
        elapsed = time.monotonic() - self._t0
        left = elapsed / max(step - self.start, 1) * (self.end - step)
        names = sorted(metrics, key=lambda k: k not in ON_BAR)  # loss and lr first
        shown = " ".join(f"{k}={metrics[k]:.4g}" for k in names)
        when = f"{tqdm.format_interval(elapsed)}<{tqdm.format_interval(left)}"
        return f"step {step}: {shown} [{step}/{self.end} {when}]"

    def log(self, message: str) -> None:
        """A line printed above the bar (eval results, early stopping)."""
        if self.shown:
            print(message, flush=True)  # above the bar: stdout is routed while it is open

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._routing.close()


def bar_postfix(metrics: dict[str, Any]) -> str:
    """'loss=0.6778 lr=5.83e-05' (and 'skipped=N' when updates were skipped)."""
    shown = {k: metrics[k] for k in ON_BAR if k in metrics}
    if metrics.get("skipped"):
        shown["skipped"] = metrics["skipped"]
    return " ".join(f"{k}={v:.4g}" if k != "lr" else f"{k}={v:.3g}" for k, v in shown.items())
