"""Progress of long work, on a terminal and in a log.

``bar(total, desc, enabled)`` is a tqdm bar with an ETA when stderr is a terminal. When it is a file
or a pipe (a log of a long run, ``nohup``, CI), tqdm would stay quiet, so the bar is instead a
``LogProgress``: one line when the work starts (its size), one after the first step (the estimated
time, once a step has been timed), then one every ``every`` seconds (done, elapsed, ETA) and one at
the end, each flushed at once. Either is quiet when ``enabled`` is False (a caller asked for no
progress, or a ``torchrun`` rank other than 0).
"""

from __future__ import annotations

import io
import os
import sys
import time

from tqdm.auto import tqdm

__all__ = ["EVERY", "LogProgress", "bar", "duration", "say"]

EVERY = 30.0  # seconds between a log's progress lines


def say(line: str) -> None:
    """Print ``line`` at once: a log written to a file is read while the run is still going."""
    print(line, flush=True)


def duration(seconds: float) -> str:
    """``seconds`` as people read a duration: 42 s, 3 min 05 s, 2 h 07 min."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class LogProgress:
    """tqdm's ``update`` / ``set_postfix`` / ``close`` as lines in a log (module doc)."""

    def __init__(self, total: int, desc: str, *, unit: str = "step", initial: int = 0,
                 every: float = EVERY, stream: io.TextIOBase | None = None,
                 clock=time.monotonic):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.every, self.stream, self.clock = every, stream or sys.stderr, clock
        self.start = self.last = clock()
        self.start_n, self.postfix, self.closed = initial, "", False
        self.units = unit + ("es" if unit.endswith(("s", "sh", "ch", "x")) else "s")
        self._say(f"{total:,} {self.units}" + (f", from {initial:,}" if initial else ""))

    def _say(self, text: str) -> None:
        print(f"{self.desc}: {text}", file=self.stream, flush=True)

    def _status(self) -> str:
        elapsed = self.clock() - self.start
        done = self.n - self.start_n
        eta = (f", about {duration(elapsed / done * (self.total - self.n))} left"
               if 0 < done and self.n < self.total else "")
        post = f" ({self.postfix})" if self.postfix else ""
        return f"{self.n:,}/{self.total:,} {self.units}, {duration(elapsed)}{eta}{post}"

    def update(self, n: int = 1) -> None:
        first = self.n == self.start_n
        self.n += n
        now = self.clock()
        if first or now - self.last >= self.every:
            self.last = now
            self._say(self._status())

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._say("done, " + self._status())

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Quiet:
    """A bar that shows nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **values) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _Quiet:
        return self

    def __exit__(self, *exc) -> None:
        pass


def _size() -> dict:
    """Nothing (tqdm measures the terminal), or 80 columns and 24 rows where the terminal reports
    0 x 0: a pseudo-terminal nobody gave a size, on which tqdm would draw nothing at all (a bar is
    drawn only on a row below ``nrows``)."""
    try:
        size = os.get_terminal_size(sys.stderr.fileno())
    except (OSError, ValueError):
        return {}
    return {"ncols": size.columns or 80, "nrows": size.lines or 24} if 0 in size else {}


def bar(total: int, desc: str, *, enabled: bool = True, unit: str = "step", initial: int = 0):
    """A progress bar for ``total`` steps of ``desc`` (module doc)."""
    if not enabled:
        return _Quiet()
    if sys.stderr.isatty():
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, **_size())
    return LogProgress(total, desc, unit=unit, initial=initial)
