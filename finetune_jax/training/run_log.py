"""What the training loop reports: step metrics fetched one log interval late (so dispatch
stays asynchronous), steady-state timing, JSONL/TensorBoard records and the progress bar."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from finetune_jax.training.metric_files import MetricWriter
from finetune_jax.training.progress_bar import Progress

# Step metrics that are the value at a step, not a quantity to average over the log interval:
# the lr logged (and shown on the bar) at step s is the lr step s used.
POINT_VALUES = frozenset({"lr"})


def say(message: str) -> None:
    """Print on process 0 only (the other processes run the same code silently)."""
    if jax.process_index() == 0:
        print(message, flush=True)


def format_metrics(metrics: dict[str, Any]) -> str:
    return " ".join(
        f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
    )


def peak_memory() -> dict[str, int | None]:
    """Peak resident memory of this process and peak bytes on its first device (None where
    the backend does not report it, e.g. XLA:CPU)."""
    import resource  # noqa: PLC0415 (POSIX only)

    host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    stats = jax.local_devices()[0].memory_stats() or {}
    return {"peak_host_rss_bytes": host, "peak_device_bytes": stats.get("peak_bytes_in_use")}


def process_seconds(_: Any = None) -> float:
    """Seconds since this process started (its argument, a value just waited for, is
    ignored: it orders the call after that value is ready)."""
    with open("/proc/self/stat") as f:  # field 22: start time in clock ticks since boot
        started = int(f.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
    with open("/proc/uptime") as f:
        return float(f.read().split()[0]) - started


class TrainLog:
    """Collects per-step device metrics and writes their means every `log_every` steps."""

    def __init__(
        self,
        workdir: str | os.PathLike,
        start: int,
        end: int,
        log_every: int,
        progress: bool,
        check: Callable[[int, dict], None] = lambda step, metrics: None,
    ):
        """`check(step, metrics)` sees every step's fetched metrics (and may raise)."""
        self.check = check
        self.writer = MetricWriter(workdir, resume_step=start)
        self.bar = Progress(start, end, enabled=progress)
        self.log_every, self.end = log_every, end
        self.pending: list[tuple[int, dict[str, jax.Array]]] = []
        self.intervals: list[float] = []  # seconds/step of each log interval
        self._t0 = time.perf_counter()

    def step(self, step: int, metrics: dict[str, jax.Array]) -> list[tuple[int, dict]]:
        """Record a step's metrics; at a log step fetch, write and return them per step."""
        self.pending.append((step, metrics))
        due = self.log_every > 0 and step % self.log_every == 0
        if not due and step != self.end:  # log_every=0: only at the end (and evals, saves)
            return []
        return self.flush()

    def flush(self) -> list[tuple[int, dict]]:
        """Fetch pending metrics now (before a checkpoint, so it never holds unseen steps)."""
        if not self.pending:
            return []
        fetched = [(s, jax.device_get(m)) for s, m in self.pending]
        step = fetched[-1][0]
        self.intervals.append((time.perf_counter() - self._t0) / len(fetched))
        scalars = [k for k, v in fetched[0][1].items() if np.ndim(v) == 0]
        means = {k: float(np.mean([m[k] for _, m in fetched])) for k in scalars}
        if "skipped" in means:  # a count over the interval, not a mean
            means["skipped"] = float(sum(m["skipped"] for _, m in fetched))
        for s, m in fetched:
            self.check(s, m)
        means["seconds_per_step"] = self.intervals[-1]
        for k in POINT_VALUES.intersection(means):  # the value at the logged step
            means[k] = float(fetched[-1][1][k])
        self.writer.write(step, "train", means)
        self.bar.update(step, means)
        self.pending = []
        self.restart_timer()
        return fetched

    def restart_timer(self) -> None:
        """Keep eval and checkpoint time out of the step timings."""
        self._t0 = time.perf_counter()

    def eval(self, step: int, results: dict[str, Any], best: float | None, improved: bool) -> None:
        self.writer.write(step, "eval", {**results, "best": best})
        self.bar.log(
            f"step {step}: eval {format_metrics(results)}" + (" (best)" if improved else "")
        )

    def record(self, step: int, kind: str, results: dict[str, Any]) -> None:
        """Write a non-periodic record (e.g. kind "final") to the metric files."""
        self.writer.write(step, kind, {k: v for k, v in results.items() if k != "split"})

    def sync(self) -> None:
        """Make the metric files durable in the workdir (uploads them for a URL workdir)."""
        self.writer.sync()

    def message(self, text: str) -> None:
        self.bar.log(text)

    def steady_seconds_per_step(self) -> float:
        """Median of the log intervals after the first (which includes compilation)."""
        steady = self.intervals[1:] or self.intervals
        return statistics.median(steady) if steady else float("nan")

    def close(self) -> None:
        self.bar.close()
        self.writer.close()
