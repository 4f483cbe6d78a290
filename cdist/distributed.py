"""Several processes, one run: what data-parallel distillation and the split discovery scans share.

cdist scales out on PyTorch's own engine. Launch any cdist command or experiment script with
``torchrun`` (one process per GPU, or per CPU group with the gloo backend)::

    torchrun --nproc-per-node 8 -m cdist.cli distill ...

and each process reads ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` from its environment
(``init_from_env``). Without torchrun, or with one process, every function here is the identity of
a single process, so library code calls them unconditionally.

The rules the callers follow:
- Training splits each global batch into equal shares, one per rank (``rows``), and gradients are
  averaged by ``DistributedDataParallel``. A batch statistic (CKA) is computed on the global batch:
  ``gather_rows`` concatenates every rank's rows *with their gradients*; its backward sums, on each
  rank, the gradients that every rank's copy of the statistic sends to that rank's rows, so after
  DDP's average each parameter's gradient is that of the single-process loss on the global batch.
- Scans split their head or sender lists (``share``) and add their per-rank sums
  (``sum_across``); every rank ends with the whole result.
- Only rank 0 writes files (``is_main``); the others wait at ``barrier``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TypeVar

import torch
import torch.distributed as dist
from jaxtyping import Float
from torch import Tensor

from cdist.errors import ConfigError

__all__ = ["active", "barrier", "broadcast", "gather_rows", "init_from_env", "is_main", "rank",
           "rows", "share", "sum_across", "world_size"]

T = TypeVar("T")


def active() -> bool:
    """Whether this process is one of several (a process group of more than one rank)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Whether this process writes files and prints (rank 0, or the only process)."""
    return rank() == 0


def init_from_env(device: str | None = None) -> str | None:
    """Join the process group that ``torchrun`` describes in the environment, once; returns the
    device this rank should use (``cuda:LOCAL_RANK`` for a CUDA device, else ``device``).

    Does nothing when ``WORLD_SIZE`` is unset or 1. The backend is NCCL for CUDA devices and gloo
    otherwise (CPU, and the tests).

    Raises:
        ConfigError: one CUDA device named for every process (``cuda:1`` under torchrun).
    """
    n = int(os.environ.get("WORLD_SIZE", "1"))
    if n <= 1:
        return device
    cuda = device is not None and str(device).startswith("cuda")
    if cuda and ":" in str(device):
        raise ConfigError(f"device={device!r} under torchrun: give 'cuda' and each process takes "
                          "the GPU of its LOCAL_RANK")
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return device


def share(items: Sequence[T]) -> list[T]:
    """This rank's share of a list of work (every ``world_size``-th item, so that layers, and
    their costs, spread evenly)."""
    return list(items[rank()::world_size()])


def rows(n: int) -> slice:
    """This rank's rows of a global batch of ``n`` (equal contiguous shares, in rank order).

    Raises:
        ConfigError: ``n`` is not a multiple of the number of processes.
    """
    k = world_size()
    if n % k:
        raise ConfigError(f"a global batch of {n} cannot be split evenly over {k} processes; "
                          f"give a batch size that is a multiple of {k}")
    return slice(rank() * n // k, (rank() + 1) * n // k)


def gather_rows(x: Float[Tensor, "rows ..."]) -> Float[Tensor, "all_rows ..."]:
    """Every rank's ``x``, concatenated in rank order along the first axis, with gradients kept
    (module doc); ``x`` itself with one process. Every rank must pass the same shape."""
    if not active():
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)


def sum_across(x: Tensor) -> Tensor:
    """The sum of ``x`` over the ranks (no gradient), on every rank."""
    if not active():
        return x
    # NCCL reduces only CUDA tensors; the scans keep their sums on the CPU
    on_nccl = dist.get_backend() == "nccl"
    out = x.to(f"cuda:{torch.cuda.current_device()}") if on_nccl else x.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(x.device)


def broadcast(obj: T) -> T:
    """Rank 0's ``obj`` (any picklable value), on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if active():
        dist.barrier()
