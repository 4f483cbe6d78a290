"""Which code and machine produced a result: the git commit (and whether the tree had uncommitted
changes) and, for a benchmark, the device's name and the wall time of a call. (Which weights and
items made a result: ``cdist.store``'s fingerprints.)"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

REPO = Path(__file__).resolve().parents[1]
T = TypeVar("T")


def git_commit() -> str:
    """``<sha>`` of HEAD, with ``+dirty`` when tracked files other than ``results/``'s differ from
    it; ``unknown`` outside a checkout.

    The mark says whether the *code* was the commit's: a run that writes into a committed results
    folder (a pilot resumed in its worktree rewrites its own records) has not changed the code.
    """
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)results"], cwd=REPO, capture_output=True, text=True,
                               check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def device_name(device: str | torch.device) -> str:
    """The GPU's name, or the CPU with the number of threads torch uses."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"


def synchronize(device: str | torch.device) -> None:
    """Wait for the GPU's queued work (a no-op on the CPU), so that a clock read after it counts
    that work."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], T], device: str | torch.device = "cpu",
          repeats: int = 1) -> tuple[T, float]:
    """``fn()``'s result and its best wall time in seconds over ``repeats`` calls (the least
    disturbed one, as timeit reports), the GPU's queued work included."""
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        result = fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return result, min(times)
