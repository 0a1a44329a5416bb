"""What a run does when something goes wrong mid-training: preemption signals and
non-finite losses or gradients."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

NONFINITE_MODES = ("halt", "skip")


class NonFiniteError(ValueError):
    """A non-finite loss or gradient under train.nonfinite='halt'."""


def nonfinite_check(trainable_paths: list[str], mode: str) -> Callable[[int, dict], None]:
    """A per-step metrics check that raises, naming the step and first bad param, in halt mode.

    The loop fetches metrics before every checkpoint, so a halted run never saves the bad
    update: the latest checkpoint stays the last good one.
    """
    if mode not in NONFINITE_MODES:
        raise ValueError(f"train.nonfinite={mode!r} is not one of {NONFINITE_MODES}")

    def check(step: int, metrics: dict[str, Any]) -> None:
        if mode != "halt":
            return
        flags = np.asarray(metrics["grad_finite"])
        if np.isfinite(metrics["loss"]) and flags.all():
            return
        where = trainable_paths[int(np.argmin(flags))] if not flags.all() else "(loss only)"
        raise NonFiniteError(
            f"step {step}: non-finite loss ({float(metrics['loss'])}) or gradient; first "
            f"non-finite gradient: {where}. Stopped before saving that step: the latest "
            "checkpoint is untouched. Lower optim.lr, check the data, or set "
            "train.nonfinite=skip to drop such updates."
        )

    return check


# The Ctrl-C that aborts without saving: the second only waits, as a reflexive double press
# during a save would otherwise lose it.
ABORT_AT_INTERRUPT = 3


class PreemptionGuard:
    """SIGTERM / SIGINT ask the loop to stop: it finishes the step, saves and exits cleanly.

    The first signal is acknowledged at once on stderr (saving, please wait). A second one
    waits for the save too, and says so; the third Ctrl-C (ABORT_AT_INTERRUPT) aborts at
    once without saving, in one line and exit status 130 (no traceback): finished
    checkpoints are complete directories that an abort leaves intact. `on_abort` runs just
    before (e.g. releasing the workdir's lock). With several processes all must stop at the
    same step, so they agree (an any-reduction over processes) at steps every process checks.
    """

    def __init__(
        self,
        signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT),
        on_abort: Callable[[], None] | None = None,
    ):
        self.received: str | None = None
        self._interrupts = 0
        self._on_abort = on_abort
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():  # handlers: main thread only
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        self._interrupts += signum == signal.SIGINT
        left = ABORT_AT_INTERRUPT - self._interrupts
        if left <= 0:
            self._abort()
        hint = ""
        if self._interrupts:
            hint = f" (Ctrl-C {left} more time{'s' * (left > 1)} aborts without saving)"
        if self.received is None:
            self.received = name
            _tell(f"{name}: saving a checkpoint after this step, then stopping; please wait{hint}")
        else:
            _tell(f"{name}: still stopping: waiting for the checkpoint to be saved{hint}")

    def _abort(self) -> None:
        _tell(
            f"Ctrl-C x{self._interrupts}: aborting now without saving; finished checkpoints "
            "are kept: rerun the same command to resume from the latest"
        )
        if self._on_abort is not None:
            with contextlib.suppress(Exception):
                self._on_abort()
        os._exit(130)  # no unwinding: it would wait for the save being aborted

    def should_stop(self, every_process_checks: bool = True) -> bool:
        """Whether any process received a signal (collective when several processes)."""
        import jax  # noqa: PLC0415

        if jax.process_count() == 1:
            return self.received is not None
        if not every_process_checks:
            return False
        from jax.experimental import multihost_utils  # noqa: PLC0415

        flags = multihost_utils.process_allgather(np.array(self.received is not None))
        if flags.any() and self.received is None:
            self.received = "a signal on another process"
        return bool(flags.any())

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _tell(line: str) -> None:
    """Write a line to stderr from a signal handler: straight to the file descriptor, since
    the handler may run in the middle of a print to the same stream."""
    with contextlib.suppress(OSError):
        os.write(2, f"\n{line}\n".encode())
