"""Progress of long work, on a terminal and in a log.

``bar(total, desc, enabled)`` is a tqdm bar with an ETA when stderr is a terminal. When it is a file
or a pipe (a log of a long run, ``nohup``, CI), tqdm would stay quiet, so the bar is instead a
``LogProgress``: one line when the work starts (its size), one after the first step (the estimated
time, once a step has been timed), then one every ``every`` seconds (done, elapsed, ETA) and one at
the end, each flushed at once. Either is quiet when ``enabled`` is False (a caller asked for no
progress, or a ``torchrun`` rank other than 0).

A step can outlast the silence a user tolerates (one pass of a 30-layer model over a large batch,
one head-map part on SmolLM2: about a minute on 2 cores), and a bar moves only when a step ends.
So every bar has a heartbeat, a thread that redraws it every ``HEARTBEAT`` seconds on a terminal
(its elapsed time moves) and in a log prints its status when ``every`` seconds passed without a
line. ``phase(desc)`` is the same for work with no steps to count (loading a model, one evaluation):
once it has run ``PHASE_DELAY`` seconds, a line that says how long (kept moving by the heartbeat),
and at its end the time it took; a shorter phase prints nothing.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator

from tqdm.auto import tqdm

__all__ = ["EVERY", "HEARTBEAT", "PHASE_DELAY", "LogProgress", "bar", "duration", "phase",
           "say"]

EVERY = 30.0  # seconds between a log's progress lines
HEARTBEAT = 5.0  # seconds between a terminal bar's redraws while a step runs
PHASE_DELAY = 10.0  # seconds a phase runs before it is shown


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


class _Heartbeat:
    """Calls ``beat`` every ``interval`` seconds, from a daemon thread, until ``stop``."""

    def __init__(self, beat: Callable[[], None], interval: float):
        self.beat, self.interval, self.stopped = beat, interval, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="cdist-progress")
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped.wait(self.interval):
            self.beat()

    def stop(self) -> None:
        self.stopped.set()
        if self.thread is not threading.current_thread():
            self.thread.join()


class LogProgress:
    """tqdm's ``update`` / ``set_postfix`` / ``close`` as lines in a log (module doc); with
    ``heartbeat``, a thread prints the status when ``every`` seconds pass without a line (tests
    drive ``beat`` themselves, with their own clock)."""

    def __init__(self, total: int, desc: str, *, unit: str = "step", initial: int = 0,
                 every: float = EVERY, stream: io.TextIOBase | None = None,
                 clock=time.monotonic, heartbeat: bool = False):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.every, self.stream, self.clock = every, stream or sys.stderr, clock
        self.start = self.last = clock()
        self.start_n, self.postfix, self.closed = initial, "", False
        self.units = unit + ("es" if unit.endswith(("s", "sh", "ch", "x")) else "s")
        self.lock = threading.Lock()  # the heartbeat's thread and the work's
        self._say(f"{total:,} {self.units}" + (f", from {initial:,}" if initial else ""))
        self.heartbeat = _Heartbeat(self.beat, min(every, HEARTBEAT)) if heartbeat else None

    def _say(self, text: str) -> None:
        print(f"{self.desc}: {text}", file=self.stream, flush=True)

    def _status(self, eta: bool = True) -> str:
        elapsed = self.clock() - self.start
        done = self.n - self.start_n
        eta = (f", about {duration(elapsed / done * (self.total - self.n))} left"
               if eta and 0 < done and self.n < self.total else "")
        post = f" ({self.postfix})" if self.postfix else ""
        return f"{self.n:,}/{self.total:,} {self.units}, {duration(elapsed)}{eta}{post}"

    def update(self, n: int = 1) -> None:
        with self.lock:
            first = self.n == self.start_n
            self.n += n
            now = self.clock()
            if first or now - self.last >= self.every:
                self.last = now
                self._say(self._status())

    def beat(self) -> None:
        """The status, if ``every`` seconds passed without a line: a step still running."""
        with self.lock:
            now = self.clock()
            if not self.closed and now - self.last >= self.every:
                self.last = now
                self._say(self._status())

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def close(self, stopped: bool = False) -> None:
        """The last line: "done", or "stopped" (no time left to tell) when the work raised."""
        if self.heartbeat is not None:
            self.heartbeat.stop()
        with self.lock:
            if not self.closed:
                self.closed = True
                self._say(("stopped, " if stopped else "done, ") + self._status(eta=not stopped))

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(stopped=exc_type is not None)


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


class _TerminalBar(tqdm):
    """tqdm, redrawn by a heartbeat every ``HEARTBEAT`` seconds until it closes (module doc)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.heartbeat = _Heartbeat(self._beat, HEARTBEAT)

    def _beat(self) -> None:
        if not self.disable:
            self.refresh()

    def close(self) -> None:
        heartbeat = getattr(self, "heartbeat", None)  # tqdm may close before __init__ ends
        if heartbeat is not None:
            heartbeat.stop()
        super().close()


def bar(total: int, desc: str, *, enabled: bool = True, unit: str = "step", initial: int = 0):
    """A progress bar for ``total`` steps of ``desc`` (module doc)."""
    if not enabled:
        return _Quiet()
    if sys.stderr.isatty():
        return _TerminalBar(total=total, initial=initial, desc=desc, unit=unit, **_size())
    return LogProgress(total, desc, unit=unit, initial=initial, every=EVERY, heartbeat=True)


@contextlib.contextmanager
def phase(desc: str, *, enabled: bool = True) -> Iterator[None]:
    """Work with no steps to count, shown while it runs (module doc). Nothing is shown for the
    first ``PHASE_DELAY`` seconds (a zoo model loads in well under one); then, on a terminal, one
    line whose clock moves every ``HEARTBEAT`` seconds, in a log a line then and every ``EVERY``
    seconds; either ends with the time it took (not when the work raised)."""
    if not enabled:
        yield
        return
    terminal, start = sys.stderr.isatty(), time.monotonic()
    shown, last = False, start

    def write(text: str) -> None:
        sys.stderr.write(text)
        sys.stderr.flush()

    def beat() -> None:
        nonlocal shown, last
        now = time.monotonic()
        if now - start < PHASE_DELAY:
            return
        if terminal:
            write(f"\r{desc}: {duration(now - start)}\x1b[K")
        elif not shown or now - last >= EVERY:
            write(f"{desc}: {duration(now - start)} so far\n")
            last = now
        shown = True

    heartbeat = _Heartbeat(beat, min(HEARTBEAT, PHASE_DELAY))
    try:
        yield
    except BaseException:
        heartbeat.stop()
        if shown and terminal:
            write("\n")
        raise
    heartbeat.stop()
    if shown:
        write(("\r" if terminal else "")
              + f"{desc}: done in {duration(time.monotonic() - start)}"
              + ("\x1b[K\n" if terminal else "\n"))
