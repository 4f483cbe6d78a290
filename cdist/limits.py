"""What the machine can hold and what a task can make: every count a user gives is checked against
its limit before anything is allocated, and refused in one line that names the limit.

- ``--threads``: at most the cores this process may run on (``os.sched_getaffinity``); more only
  makes the threads wait for each other (10,000 of them hang a 2-core machine).
- Seeds: whole numbers in ``[0, 2**32)``. Every generator cdist seeds takes them (torch's takes
  ``[-2**63, 2**64)``, and the shuffled control seeds it with ``seed * 1_000_003 + step``), and a
  negative seed would name its run folder ``...-seed-1``, read as seed 1.
- Item counts: at most the distinct items the task can make (``distinct_items``), and as many as
  fit in half the memory free now, at the bytes one made item takes (``check_item_memory``). A
  count within both but large is made with a progress bar (``cdist.tasks.common.draw_split``).
- Random circuits: at most the distinct head sets of the circuit's size (``check_random_circuits``).
- Batch size: one training step's activations, estimated from the models' shapes, must fit in the
  memory free now (``check_batch_memory``).

The memory figures are estimates, meant to refuse what cannot fit by a wide margin (a count typed
with three zeros too many), not to pack the machine: a refusal says the estimate and the limit.
"""

from __future__ import annotations

import math
import os

from cdist.errors import ConfigError

__all__ = ["SEED_LIMIT", "available_memory", "check_batch_memory", "check_item_memory",
           "check_random_circuits", "check_seed", "check_threads", "cores", "gigabytes"]

SEED_LIMIT = 2**32
# Python's objects while items are made (strings, lists, the tokenizer's output) weigh several
# times the finished Arrow table (measured: about 1.4 KB an entity-tracking item in Arrow, under
# 10 KB at its peak while made)
_ITEM_OVERHEAD = 8
# a training step holds the student's activations for its backward pass, their gradients and the
# teacher's forward: about 3 times one forward's
_STEP_FACTOR = 3


def cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def check_threads(threads: int | None, flag: str = "--threads") -> None:
    """Refuse a thread count below 1 or above ``cores()``; None is torch's default."""
    if threads is None:
        return
    if threads < 1:
        raise ConfigError(f"{flag} {threads}: give 1 or more (or leave it out)")
    if threads > cores():
        raise ConfigError(f"{flag} {threads}: this process may run on {cores()} cores; give at "
                          f"most {cores()} (or leave it out)")


def check_seed(name: str, value) -> None:
    """Refuse a seed that is not a whole number in ``[0, SEED_LIMIT)`` (module doc)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name}={value!r}; give a whole number")
    if not 0 <= value < SEED_LIMIT:
        raise ConfigError(f"{name}={value} is outside the seeds' range; give 0 to "
                          f"{SEED_LIMIT - 1}")


def available_memory(device: str = "cpu") -> int:
    """Bytes free now on ``device``: the GPU's free memory, or the machine's available memory
    (``MemAvailable``: free plus what the kernel can reclaim)."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def gigabytes(n: float) -> str:
    """Bytes as people read them: 21.3 GB, 1.13 TB."""
    return f"{n / 1e12:.3g} TB" if n >= 1e12 else f"{n / 1e9:.3g} GB"


def check_item_memory(counts: dict[str, tuple[int, int]], item_bytes: int) -> None:
    """Refuse item sets that would not fit in half the memory free now, at ``item_bytes`` (one
    made item's Arrow bytes) each with Python's overhead while they are made. ``counts``: what
    sets each count (a flag) -> (its value, the items made for it)."""
    free = available_memory()
    each = max(item_bytes, 1) * _ITEM_OVERHEAD
    total = sum(made for _, made in counts.values()) * each
    if total > free / 2:
        what, (n, _) = max(counts.items(), key=lambda kv: kv[1][1])
        raise ConfigError(f"{what} {n:,}: the items would take about {gigabytes(total)} while "
                          f"made, above half the {gigabytes(free)} free (about "
                          f"{int(free / 2 / each):,} items in all fit); ask for fewer items")


def check_random_circuits(n_random: int, n_heads: int, size: int, what: str) -> None:
    """Refuse more random circuits than there are distinct sets of ``size`` of ``n_heads``
    heads (each draw is one of them). A circuit of no head or of every head is its own only
    random circuit, read as often as asked (tests of the ends)."""
    distinct = math.comb(n_heads, size)
    if 0 < size < n_heads and n_random > distinct:
        raise ConfigError(f"n_random={n_random:,}: {what} has {size} of its model's {n_heads} "
                          f"heads, which make only {distinct:,} distinct random circuits of that "
                          f"size; give --n-random {distinct:,} or fewer")


def step_bytes(batch: int, seq: int, shape: dict) -> int:
    """An estimate of one training step's activation memory (module doc) for a model of
    ``shape`` (``n_layers``, ``d_model``, ``n_heads``, ``d_mlp``, ``d_vocab``), float32."""
    per_token = shape["n_layers"] * (12 * shape["d_model"] + 3 * shape["d_mlp"]
                                     + 2 * shape["n_heads"] * seq) + shape["d_vocab"]
    return _STEP_FACTOR * 4 * batch * seq * per_token


def check_batch_memory(batch: int, seq: int, shapes: dict[str, dict], device: str) -> None:
    """Refuse a batch size whose training step (the student's and the teacher's activations,
    ``shapes``: role -> model shape) would not fit in the memory free now on ``device``."""
    need = sum(step_bytes(batch, seq, shape) for shape in shapes.values())
    free = available_memory(device)
    if need > free:
        per_item = need / batch
        raise ConfigError(f"--batch-size {batch:,}: one training step would take about "
                          f"{gigabytes(need)} on {device}, above the {gigabytes(free)} free; "
                          f"give at most {max(int(free / per_item), 1):,}")
