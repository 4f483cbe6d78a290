"""Portable CPU numerics: a model fine-tuned on one x86-64 machine is, bit for bit, the model the
same command makes on another.

Why: a table reuses a finished run only for the model weights it was made with (their
fingerprint, ``cdist.store.model_fingerprint``), and the SmolLM2 models live out of git, rebuilt
on each machine. The same ``cdist finetune`` call (same source, items, seed, one thread) made
the IOI student ``0809c0a4...`` on one machine and ``48ffe54a...`` on another (an AMD EPYC with
AVX-512), with the same validation curve to the last digit: torch picks its vector kernels by
the CPU (AVX-512 where there is one) and MKL its matrix-multiply code path, so sums are added in
another order and the last bits differ, and every result recorded for the first build was
refused for the second. ``pin`` fixes what the CPU chooses:

- torch's kernels at AVX2 (``ATEN_CPU_CAPABILITY``), which every x86-64 CPU of the last ten
  years has;
- MKL's at its AVX2 path with its conditional numerical reproducibility (``MKL_CBWR``);
- oneDNN's at AVX2 (``ONEDNN_MAX_CPU_ISA``);
- one thread (MKL's and torch's parallel sums depend on the thread count).

On the machine above, AVX2 kernels on one thread gave ``f5c677a6...`` with and without
``MKL_CBWR``, and so did two builds through ``pin``; on the zoo's et-student, leaving out
``MKL_CBWR`` changed the weights, so both settings count. torch reads its choice once, at the
first CPU kernel, so ``pin`` must run before any model loads; a process past that point is
refused rather than silently left unpinned. ``state`` says what a process runs with, for a
record. The test suite computes with these kernels too (``tests/conftest.py``), so that its
bit-for-bit golden table holds on any such machine: on this one, every run of a record made
elsewhere differed in its last bits.
"""

from __future__ import annotations

import os
import platform

from cdist.errors import ConfigError

__all__ = ["PORTABLE", "pin", "pinned", "state"]

# the settings of a portable process (environment variables the libraries read at first use)
PORTABLE = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def pin() -> dict:
    """Make this process's CPU arithmetic portable (module doc) and return ``state()``.

    Raises:
        ConfigError: torch already chose its kernels (a model was loaded or a tensor computed
            before), or this CPU has no AVX2 (not x86-64, or an old one).
    """
    import torch

    os.environ.update(PORTABLE)
    torch.set_num_threads(1)
    if not pinned():
        raise ConfigError(
            f"portable numerics need torch's CPU kernels at AVX2, but this process runs "
            f"{torch.backends.cpu.get_cpu_capability()}: call cdist.numerics.pin() before any "
            f"model loads (torch chooses at its first CPU kernel), on an x86-64 CPU with AVX2")
    return state()


def pinned() -> bool:
    """Whether this process computes as ``pin`` sets it."""
    import torch

    return (torch.backends.cpu.get_cpu_capability() == "AVX2" and torch.get_num_threads() == 1
            and all(os.environ.get(k) == v for k, v in PORTABLE.items()))


def state() -> dict:
    """What this process's CPU arithmetic depends on: torch's kernels, its threads, the pinned
    variables and the processor."""
    import torch

    return {"portable": pinned(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "machine": platform.machine(),
            "env": {k: os.environ.get(k) for k in PORTABLE}, "torch": torch.__version__}
