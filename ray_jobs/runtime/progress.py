"""Progress lines: what a job tells its user while it runs.

``say`` writes one ``[medbalance]`` line. Inside a Ray Train worker, Ray patches ``print`` into
its logger, whose handlers show each line twice on the driver; writing to stdout directly shows it
once (Ray forwards a worker's stdout to the driver).

``Progress`` counts rows of a long step (evaluating a large split, predicting a folder) and prints
a line at most every ``every`` seconds, and one at the end.
"""
from __future__ import annotations

import sys
import time


def say(message: str) -> None:
    """One progress line on stdout, flushed."""
    sys.stdout.write(f"[medbalance] {message}\n")
    sys.stdout.flush()


class Progress:
    """``Progress("scored", total=400).update(64)`` -> ``[medbalance] scored 64/400 rows (...)``."""

    def __init__(self, what: str, total: int | None = None, every: float = 5.0, unit: str = "rows"):
        self.what, self.total, self.every, self.unit = what, total, every, unit
        self.done = 0
        self.started = self.last = time.perf_counter()

    def update(self, count: int) -> None:
        self.done += count
        now = time.perf_counter()
        if now - self.last >= self.every:
            self.last = now
            say(self._line(now))

    def finish(self) -> None:
        say(self._line(time.perf_counter()))

    def _line(self, now: float) -> str:
        seconds = max(now - self.started, 1e-9)
        of = f"/{self.total}" if self.total is not None else ""
        return f"{self.what} {self.done}{of} {self.unit} ({self.done / seconds:.0f} {self.unit}/s, {seconds:.0f} s)"
