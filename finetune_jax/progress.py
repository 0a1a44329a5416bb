"""What a person watching a long phase sees: a tqdm bar on a terminal, a plain line every
half minute in a log file (stderr not a terminal), nothing on processes other than 0.

  track(items, total, label, unit)  iterate, showing progress (eval batches, audio clips)
  on_terminal()                     whether bars are drawn (stderr is a terminal)
  terminal_stream()                 where bars draw: the real stderr
  printing_above_bars()             while open, prints, warnings and log records on stdout /
                                    stderr are written above the bars, not onto their line
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import jax
from tqdm import tqdm

T = TypeVar("T")

LOG_EVERY_S = 30.0  # seconds between progress lines in a log file

_REAL: dict[str, Any] = {}  # the real sys.stdout / sys.stderr while printing_above_bars


def shown() -> bool:
    """Whether this process shows progress (process 0 of a multi-process run)."""
    return jax.process_index() == 0


def terminal_stream() -> Any:
    """Where bars draw: stderr (the real one while prints are routed above the bars)."""
    return _REAL.get("stderr", sys.stderr)


def on_terminal() -> bool:
    """Whether stderr is a terminal, where a bar redraws one line; else (a log file, a pipe)
    progress is plain lines, as carriage returns would run the updates together."""
    isatty = getattr(terminal_stream(), "isatty", None)
    return bool(isatty and isatty())


@contextlib.contextmanager
def printing_above_bars() -> Iterator[None]:
    """Route sys.stdout and sys.stderr through tqdm's external write mode: each complete
    line clears the open bars, is written, and the bars are drawn again below it. Python
    warnings, absl / logging records and prints read the streams when they write, so they
    all land on their own lines. Nested uses route once."""
    if _REAL:
        yield
        return
    _REAL.update(stdout=sys.stdout, stderr=sys.stderr)
    sys.stdout, sys.stderr = _AboveBars(sys.stdout), _AboveBars(sys.stderr)
    try:
        yield
    finally:
        routed = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _REAL.pop("stdout"), _REAL.pop("stderr")
        for stream in routed:
            if isinstance(stream, _AboveBars):
                stream.flush()


class _AboveBars:
    """A text stream that writes whole lines above the bars (see `printing_above_bars`)."""

    def __init__(self, wrapped: Any):
        self._wrapped, self._partial = wrapped, ""

    def write(self, text: str) -> int:
        head, newline, tail = (self._partial + text).rpartition("\n")
        self._partial = tail
        if newline:
            with tqdm.external_write_mode(file=terminal_stream()):
                self._wrapped.write(head + newline)
                self._wrapped.flush()
        return len(text)

    def flush(self) -> None:
        if self._partial:
            with tqdm.external_write_mode(file=terminal_stream()):
                self._wrapped.write(self._partial)
            self._partial = ""
        self._wrapped.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, ...
        return getattr(self._wrapped, name)


def track(
    items: Iterable[T],
    total: int | None,
    label: str,
    unit: str,
    every_s: float | None = None,
) -> Iterator[T]:
    """`items`, showing how many are done: a bar that disappears when done on a terminal;
    in a log, a line every `every_s` seconds (LOG_EVERY_S; nothing for a shorter phase)."""
    every_s = LOG_EVERY_S if every_s is None else every_s
    if not shown():
        yield from items
    elif on_terminal():
        with printing_above_bars():
            bar = tqdm(
                total=total,
                desc=label,
                unit=unit,
                leave=False,
                dynamic_ncols=True,
                file=terminal_stream(),
            )
            with bar:
                for item in items:
                    yield item
                    bar.update()
    else:
        start = last = time.monotonic()
        for done, item in enumerate(items, 1):
            yield item
            now = time.monotonic()
            if now - last >= every_s:
                last = now
                print(progress_line(label, done, total, unit, now - start), file=sys.stderr)
                sys.stderr.flush()


def progress_line(label: str, done: int, total: int | None, unit: str, elapsed: float) -> str:
    """E.g. 'eval validation: 120/188 batches (64%), 00:40 elapsed, ~00:22 left'."""
    units = unit + ("es" if unit.endswith(("s", "x", "ch", "sh")) else "s")
    line = f"{label}: {done}"
    if total:
        left = elapsed / done * (total - done)
        line += f"/{total} {units} ({100 * done // total}%), "
        line += f"{tqdm.format_interval(elapsed)} elapsed, ~{tqdm.format_interval(left)} left"
    else:
        line += f" {units}, {tqdm.format_interval(elapsed)} elapsed"
    return line
