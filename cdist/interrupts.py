"""Ctrl-C and SIGTERM: a command stops where it is, says in one line what was kept and how to go
on, and exits with 130 or 143 (128 + the signal's number, as a shell reports a process a signal
ended).

Stopping anywhere is safe because every file cdist writes is written whole or not at all
(``cdist.checkpoints``: a temporary file renamed into place, removed when a write is cut short,
and swept by the next ``run_folder.claim``), and every step resumes from what its run folder holds
(the store's records, a run's last checkpoint). So the handler only turns the signal into an
exception, ``Interrupted``: the step unwinds through its ``finally`` blocks (the temporary file of
a write in progress removed, the folder's lock released) and ``cdist.cli.main`` prints the line. It
is a ``KeyboardInterrupt``, so no ``except Exception`` on the way can swallow it. A second signal
while the first unwinds ends the process at once (``os._exit``), for a user who will not wait.

Python runs a handler between two bytecodes, so a step stops as soon as the torch operation in
progress returns: well under a second for the models here.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

__all__ = ["Interrupted", "message", "trapped"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A command stopped by SIGINT or SIGTERM (``signum``); ``folders``: the run folders it held,
    which keep its finished work."""

    def __init__(self, signum: int, folders: Sequence[Path] = ()):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.folders = signum, tuple(folders)

    @property
    def status(self) -> int:
        return 128 + self.signum


def message(command: str, stop: KeyboardInterrupt) -> str:
    """The one line a stopped ``command`` (``cdist distill``) prints."""
    signum = getattr(stop, "signum", signal.SIGINT)
    how = f"interrupted by {signal.Signals(signum).name}"
    folders = getattr(stop, "folders", ())
    if folders:
        kept = " and ".join(map(str, folders))
        return (f"{command}: {how}; {kept} keeps the finished work; run the same command to "
                "resume")
    return f"{command}: {how}; no file was left half-written; run the same command again"


@contextlib.contextmanager
def trapped(command: str, *, quiet: bool = False) -> Iterator[None]:
    """Within: SIGINT and SIGTERM raise ``Interrupted`` (module doc), and a second one ends the
    process at once with its status, after one line (none when ``quiet``: a ``torchrun`` rank
    other than 0). The previous handlers come back on leaving. Outside the main thread (where
    Python allows no handler) nothing changes."""
    raised = []

    def handler(signum, frame):
        if raised:
            if not quiet:
                print(f"{command}: {signal.Signals(signum).name} again: stopped at once; run the "
                      "same command to resume", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        raised.append(signum)
        raise Interrupted(signum)

    try:
        before = {s: signal.signal(s, handler) for s in _SIGNALS}
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        for s, previous in before.items():
            signal.signal(s, previous)
