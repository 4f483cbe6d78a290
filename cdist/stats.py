"""Statistics for comparing methods: rank correlation of head scores, McNemar's test of paired
accuracies and its stratified (Cochran-Mantel-Haenszel) form pooled over seeds.

Small, dependency-free (torch and the standard library) and checked in the tests against scipy and
statsmodels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

import torch
from torch import Tensor

from cdist.errors import InputError

__all__ = ["mcnemar", "mcnemar_pooled", "rankdata", "spearman"]


def rankdata(x: Tensor) -> Tensor:
    """Ranks 1..n of a 1-d tensor, ties given their average rank (scipy's
    ``rankdata(method="average")``)."""
    x = x.detach().double().flatten().cpu()
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(1, len(x) + 1, dtype=torch.float64)
    _, inverse, counts = torch.unique(x, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(counts), dtype=torch.float64).index_add_(0, inverse, ranks)
    return (sums / counts)[inverse]


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman's rank correlation of two equally shaped tensors (flattened); NaN if either is
    constant."""
    if a.numel() != b.numel() or a.numel() < 2:
        raise InputError(f"spearman needs two tensors of one size >= 2; got {a.numel()} and "
                         f"{b.numel()} values")
    ra, rb = rankdata(a), rankdata(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = (ra.square().sum() * rb.square().sum()).sqrt()
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


def mcnemar(correct_a: Tensor, correct_b: Tensor) -> dict:
    """Exact McNemar test: do two methods differ in accuracy on the same items?

    Only discordant items count: ``b`` = items A gets right and B wrong, ``c`` = the reverse. Under
    the null hypothesis each discordant item is a fair coin, so the two-sided exact p-value is
    ``min(1, 2 * P(Binomial(b + c, 1/2) <= min(b, c)))``, computed in exact rational arithmetic (1.0
    when there are no discordant items).

    Args:
        correct_a: per-item correctness of method A (bool or 0/1), e.g.
            ``evaluate_circuit(...)["full_correct"]``.
        correct_b: the same items under method B.

    Returns:
        ``{"b", "c", "n_discordant", "p_value"}``.
    """
    a, b_ = correct_a.flatten().bool().cpu(), correct_b.flatten().bool().cpu()
    if a.shape != b_.shape:
        raise InputError(f"McNemar pairs items: got {a.numel()} and {b_.numel()} results; "
                         "evaluate both methods on the same items")
    b, c = int((a & ~b_).sum()), int((~a & b_).sum())
    return {"b": b, "c": c, "n_discordant": b + c, "p_value": _exact_p(b, c)}


def _exact_p(b: int, c: int) -> float:
    n = b + c
    tail_count = sum(math.comb(n, k) for k in range(min(b, c) + 1))
    tail = Fraction(tail_count, 2**n) if n else Fraction(1, 2)
    return float(min(Fraction(1), 2 * tail))


def mcnemar_pooled(correct_a: Sequence[Tensor], correct_b: Sequence[Tensor]) -> dict:
    """McNemar's test pooled over strata (seeds): the Cochran-Mantel-Haenszel test for matched
    pairs.

    Each (item, seed) is a matched pair: A and B are trained with the same seed and tested on the
    same item. Treating every pair as its own stratum, the CMH statistic is ``(B - C)^2 / (B + C)``
    with ``B = sum_k b_k`` and ``C = sum_k c_k`` the discordant counts of the per-seed McNemar
    tables, chi-square with 1 degree of freedom; conditionally on the discordant counts each
    discordant pair is a fair coin under the null hypothesis, so ``B ~ Binomial(B + C, 1/2)`` gives
    the exact p-value too. ``B / C`` is the Mantel-Haenszel estimate of the common odds ratio (A
    right and B wrong vs the reverse).

    Args:
        correct_a: per seed, A's per-item correctness.
        correct_b: per seed, B's on the same items, in the same order.

    Returns:
        ``{"b", "c", "n_discordant", "statistic", "p_value_chi2", "p_value" (exact), "odds_ratio",
        "strata"}``.
    """
    if len(correct_a) != len(correct_b) or not correct_a:
        raise InputError("pooling needs the same strata for both methods; "
                         f"got {len(correct_a)} and {len(correct_b)}")
    per = [mcnemar(a, b) for a, b in zip(correct_a, correct_b, strict=True)]
    b, c = sum(t["b"] for t in per), sum(t["c"] for t in per)
    n = b + c
    statistic = (b - c) ** 2 / n if n else 0.0
    return {"b": b, "c": c, "n_discordant": n, "statistic": statistic,
            # chi-square with 1 degree of freedom: P(X > s) = erfc(sqrt(s / 2))
            "p_value_chi2": math.erfc(math.sqrt(statistic / 2)), "p_value": _exact_p(b, c),
            "odds_ratio": b / c if c else math.inf if b else math.nan, "strata": len(per)}
