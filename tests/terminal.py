"""A pseudo-terminal of a given width and the screen it shows, for tests of what a person
watching a run sees (bars redrawn in place, lines printed above them)."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import sys
import termios

_ESCAPE = re.compile(r"\x1b\[(\d*)([A-Za-z])")


class Terminal:
    """A pty `columns` wide: `stream` is the text file a program writes to (a TTY to
    tqdm), `screen()` the lines a person would see after everything written so far."""

    def __init__(self, columns: int = 120, rows: int = 40):
        self.columns = columns
        self._master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
        self.stream = os.fdopen(slave, "w", buffering=1)
        self._raw = ""

    def raw(self) -> str:
        """Everything written so far, as the terminal received it."""
        self.stream.flush()
        while select.select([self._master], [], [], 0.05)[0]:
            self._raw += os.read(self._master, 65536).decode("utf-8", "replace")
        return self._raw

    def screen(self) -> list[str]:
        """The screen's lines (trailing blanks stripped, trailing empty lines dropped):
        carriage returns, newlines, cursor-up and line wrapping as a terminal does them."""
        lines, row, col = [[]], 0, 0
        raw, i = self.raw(), 0
        while i < len(raw):
            escape = _ESCAPE.match(raw, i)
            if escape:
                if escape.group(2) == "A":  # cursor up (tqdm moves between its bars)
                    row = max(row - int(escape.group(1) or 1), 0)
                i = escape.end()
                continue
            char, i = raw[i], i + 1
            if char == "\r":
                col = 0
            elif char == "\n":
                row += 1
            else:
                if col >= self.columns:  # the terminal wraps a too-long line
                    row, col = row + 1, 0
                while len(lines) <= row:
                    lines.append([])
                line = lines[row]
                line.extend(" " * (col + 1 - len(line)))
                line[col] = char
                col += 1
            while len(lines) <= row:
                lines.append([])
        text = ["".join(line).rstrip() for line in lines]
        while text and not text[-1]:
            text.pop()
        return text

    def as_console(self, monkeypatch) -> None:
        """Make this terminal sys.stdout and sys.stderr, as in an interactive shell. Call it
        in the test itself: pytest's output capture re-installs its own streams after the
        fixtures have run."""
        monkeypatch.setattr(sys, "stdout", self.stream)
        monkeypatch.setattr(sys, "stderr", self.stream)

    def close(self) -> None:
        self.stream.close()
        os.close(self._master)
