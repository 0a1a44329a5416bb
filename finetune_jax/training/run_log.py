"""What the training loop reports: step metrics fetched one log interval late (so dispatch
stays asynchronous), steady-state timing, JSONL/TensorBoard records and the progress bar.

A record is written every `log_every` steps (at evals, and at the run's last step): the
means over the steps since the last record, a window that checkpoints do not close. Its
running sums (`log_window.py`) are saved with each checkpoint, so a resumed run logs the
values an uninterrupted one logs."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax

from finetune_jax.training.log_window import LogWindow
from finetune_jax.training.metric_files import MetricWriter
from finetune_jax.training.progress_bar import Progress


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
        window: dict[str, Any] | None = None,
    ):
        """`check(step, metrics)` sees every step's fetched metrics (and may raise);
        `window`: the open log window a resumed checkpoint saved (`window_state`)."""
        self.check = check
        self.writer = MetricWriter(workdir, resume_step=start)
        self.bar = Progress(start, end, enabled=progress)
        self.log_every, self.end = log_every, end
        self.pending: list[tuple[int, dict[str, jax.Array]]] = []
        self.window = LogWindow.from_dict(window)
        self.intervals: list[float] = []  # seconds/step of each log interval
        # Step time and steps timed in this process since the last record (a window
        # carried over from a checkpoint was timed by another process).
        self._seconds, self._timed = 0.0, 0
        self._t0 = time.perf_counter()

    def step(self, step: int, metrics: dict[str, jax.Array]) -> list[tuple[int, dict]]:
        """Record a step's metrics; at a log step fetch, write and return them per step."""
        self.pending.append((step, metrics))
        due = self.log_every > 0 and step % self.log_every == 0
        if not due and step != self.end:  # log_every=0: only at the end (and evals)
            return []
        return self.flush()

    def fetch(self) -> list[tuple[int, dict]]:
        """Fetch pending metrics into the open window without writing a record (before a
        checkpoint, so it never holds unseen steps and saves the window's sums)."""
        if not self.pending:
            return []
        fetched = [(s, jax.device_get(m)) for s, m in self.pending]
        for s, m in fetched:
            self.check(s, m)
        for _, m in fetched:
            self.window.add(m)
        self._seconds += time.perf_counter() - self._t0
        self._timed += len(fetched)
        self.pending = []
        self.restart_timer()
        return fetched

    def flush(self) -> list[tuple[int, dict]]:
        """Fetch pending metrics and write the window's record at the latest step (at log
        steps, evals and the end)."""
        fetched = self.fetch()
        if fetched:
            self._write(fetched[-1][0])
        return fetched

    def _write(self, step: int) -> None:
        """The open window's record at `step`; a new window starts."""
        values = self.window.values()
        self.intervals.append(self._seconds / self._timed)
        values["seconds_per_step"] = self.intervals[-1]
        self.writer.write(step, "train", values)
        self.bar.update(step, values)
        self.window = LogWindow()
        self._seconds, self._timed = 0.0, 0

    def window_state(self) -> dict[str, Any]:
        """The open window (call `fetch` first), for the checkpoint's progress item."""
        return self.window.to_dict()

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
