"""The training data's order: endless shuffled batches from a seed, and the shuffled control's
permutations, both the same again when a run resumes."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from cdist import evaluate

__all__ = ["batch", "batch_stream", "permutation"]


def batch_stream(data, batch_size: int, seed: int, pad: int, columns: Sequence[str]
                 ) -> Iterator[dict]:
    """Endless shuffled batches (a new order every epoch, from ``seed``), each with its items'
    ``index`` in ``data`` (a teacher cache's rows); the last short batch is dropped."""
    rng = random.Random(seed)
    order = list(range(len(data)))
    while True:
        rng.shuffle(order)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield batch(data, order[start : start + batch_size], pad, columns)


def batch(data, index: list[int], pad: int, columns: Sequence[str]) -> dict:
    """The items at ``index``, padded with ``pad`` into one batch that carries ``columns`` and the
    items' ``index``."""
    first = next(evaluate.batches(data.select(index), len(index), pad, columns))
    return first | {"index": torch.tensor(index)}


def permutation(m: int, seed: int, step: int) -> Tensor:
    """The shuffled control's permutation of a batch's teacher rows at ``step`` (the same after a
    resume): the aligned pairs with the item correspondence broken, so that the CKA term keeps its
    scale but carries no information about which item is which."""
    return torch.randperm(m, generator=torch.Generator().manual_seed(seed * 1_000_003 + step))
