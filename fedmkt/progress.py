"""Progress a person can follow in a log: plain lines where the output is not a terminal.

On a terminal, phases and evaluations draw tqdm bars. Written to a file or a pipe, those bars are
one endless line of carriage returns; there each phase and evaluation writes a line when it
starts, one every `EVERY_S` seconds while it runs, and one when it ends, with its seconds.
"""

from __future__ import annotations

import sys
import time
from typing import Optional

__all__ = ["EVERY_S", "LineProgress", "on_terminal"]

EVERY_S = 15.0
"""Seconds between two progress lines of one running step."""


def on_terminal() -> bool:
    """Whether progress goes to a terminal (stderr), where a bar redraws in place."""
    return sys.stderr.isatty()


class LineProgress:
    """tqdm's `update` / `reset` / `close`, written as lines: `client_0 · evaluate · round 1: 40/120 q, 15 s`."""

    def __init__(self, total: int, description: str, unit: str = "q", every_s: float = EVERY_S) -> None:
        self.total, self.description, self.unit, self.every_s = total, description, unit, every_s
        self.done = 0
        self.started = self.last = time.monotonic()
        self._line(f"started, {total} {unit}")

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            self._line(f"{self.done}/{self.total} {self.unit}, {now - self.started:.0f} s")

    def reset(self, total: Optional[int] = None) -> None:
        self.done = 0
        self.total = self.total if total is None else total

    def close(self) -> None:
        self._line(f"done, {self.done} {self.unit} in {time.monotonic() - self.started:.1f} s")

    def _line(self, text: str) -> None:
        print(f"{self.description}: {text}", file=sys.stderr, flush=True)
