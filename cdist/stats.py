"""Statistics for comparing methods: rank correlation of head scores.

Small, dependency-free (torch only) and checked in the tests against scipy.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["rankdata", "spearman"]


def rankdata(x: Tensor) -> Tensor:
    """Ranks 1..n of a 1-d tensor, ties given their average rank (scipy's ``rankdata(method="average")``)."""
    x = x.detach().double().flatten().cpu()
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(1, len(x) + 1, dtype=torch.float64)
    _, inverse, counts = torch.unique(x, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(counts), dtype=torch.float64).index_add_(0, inverse, ranks)
    return (sums / counts)[inverse]


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman's rank correlation of two equally shaped tensors (flattened); NaN if either is constant."""
    if a.numel() != b.numel() or a.numel() < 2:
        raise ValueError(f"spearman needs two tensors of one size >= 2; got {a.numel()} and {b.numel()} values")
    ra, rb = rankdata(a), rankdata(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = (ra.square().sum() * rb.square().sum()).sqrt()
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")
