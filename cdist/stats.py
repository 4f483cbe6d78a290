"""Statistics for comparing methods: rank correlation of head scores, and tests of paired
accuracies that respect how a table is built.

A table trains each arm once per seed and evaluates every run on the same test items, keeping each
item's correctness. Two things repeat: runs (seeds) and items. The run is the unit of replication:
what a reader wants to know is whether another training run of arm A would beat one of arm B, and
the item-level noise of one evaluation is only part of that. So the primary reading is
``seed_difference``: the mean over seeds of the per-seed accuracy difference A - B, with a paired
t interval (df = seeds - 1) and an equivalence test (two one-sided tests at +-margin; Schuirmann
1987), so that a null result says how large a difference it excludes.

The item-level tests are for robustness. ``clustered_mcnemar`` is McNemar's test with items as
clusters of their per-seed pairs (Durkalski et al. 2003): an item that A gets right and B wrong in
every seed counts once, with its seed-to-seed agreement, not as independent coin flips.
``mcnemar_pooled`` (Cochran-Mantel-Haenszel over seeds) treats every (item, seed) pair as
independent; where seeds share items, or share training items so that runs agree with each other,
it is too confident, and ``compare`` labels it as not for the primary reading. ``holm`` adjusts the
secondary comparisons of a table for their number (Holm 1979). Power for planning seeds and test
items is in ``cdist.power``.

Exact McNemar tails in rational arithmetic; t and chi-square distributions from scipy. Every
statistic is checked in the tests against scipy and statsmodels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

import torch
from jaxtyping import Bool
from scipy import stats as scipy_stats
from torch import Tensor

from cdist.errors import InputError

__all__ = ["VERDICTS", "Bits", "clustered_mcnemar", "compare", "holm", "mcnemar", "mcnemar_pooled",
           "rankdata", "seed_difference", "spearman"]

# One run's per-item correctness on an evaluation set. The underscore keeps jaxtyping from
# binding the length across the runs of a sequence: unequal lengths are the functions' own
# InputError, with a message that says what to fix.
Bits = Bool[Tensor, " _item"]
VERDICTS = ("better", "worse", "equivalent", "different but within margin", "inconclusive")


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


def _floats(values: Sequence[float], what: str) -> list[float]:
    out = [float(v) for v in values]
    if not all(math.isfinite(v) for v in out):
        raise InputError(f"{what} holds a value that is not finite: {out}")
    return out


def _check_level(alpha: float, margin: float | None = None) -> None:
    if not 0 < alpha < 1:
        raise InputError(f"alpha {alpha} is no significance level; give one in (0, 1), e.g. 0.05")
    if margin is not None and not (math.isfinite(margin) and margin > 0):
        raise InputError(f"margin {margin} must be a positive accuracy difference, e.g. 0.02")


def _verdict(ci: tuple[float, float], equivalent: bool) -> str:
    excludes_zero = ci[0] > 0 or ci[1] < 0
    if excludes_zero:
        return "different but within margin" if equivalent else "better" if ci[0] > 0 else "worse"
    return "equivalent" if equivalent else "inconclusive"


def seed_difference(acc_a: Sequence[float], acc_b: Sequence[float], *, margin: float,
                    alpha: float = 0.05) -> dict:
    """Arm A against arm B with the run as the unit: the paired t-test over seeds and its
    equivalence twin.

    Each seed trains A and B once and measures each run's accuracy; ``d_s = acc_a[s] - acc_b[s]``.
    The mean of ``d`` estimates how much better a run of A is than a run of B, and its spread
    over seeds holds everything that varies between runs (training data order, draws, item
    noise). The interval is ``mean +- t_{1-alpha/2, n-1} * sd / sqrt(n)`` and the p-value is the
    two-sided paired t-test's. TOST (Schuirmann 1987) tests whether the difference lies within
    ``+-margin``: two one-sided t-tests, H0 mean <= -margin and H0 mean >= margin, whose larger
    p-value is ``tost_p``; below ``alpha`` both are rejected and the arms are equivalent to within
    the margin (equivalently, the 1 - 2 alpha interval lies inside it).

    The verdict reads both: "better"/"worse" when the interval excludes 0 and TOST fails;
    "equivalent" when TOST passes and the interval holds 0; "different but within margin" when
    the interval excludes 0 yet TOST passes (a real but small difference); "inconclusive" when
    neither test decides (more seeds needed; ``cdist.power.seeds_for_power`` says how many).

    Args:
        acc_a: per-seed accuracies of arm A.
        acc_b: arm B's, of the same seeds in the same order.
        margin: the equivalence margin, a positive accuracy difference (0.02: two points).
        alpha: the level of each test; the interval covers 1 - alpha.

    Returns:
        ``{"n_seeds", "diffs", "mean", "sd", "se", "ci", "p_value", "margin", "alpha", "tost_p",
        "equivalent", "verdict", "note"}``; ``note`` is None unless the tests are undefined.

    Warning:
        With one seed there is no run-to-run spread to test against: sd, the interval and both
        p-values are NaN and the verdict is "inconclusive". With sd = 0 (every seed the same
        difference, as happens when accuracies are identical) the t statistic divides by zero:
        the same, and ``note`` says which. A few seeds give a wide interval; that is the honest
        answer, not a defect.
    """
    a, b = _floats(acc_a, "acc_a"), _floats(acc_b, "acc_b")
    if len(a) != len(b) or not a:
        raise InputError(f"pairing seeds needs one accuracy per seed for each arm; got {len(a)} "
                         f"and {len(b)}")
    _check_level(alpha, margin)
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    n = len(diffs)
    mean = math.fsum(diffs) / n
    out = {"n_seeds": n, "diffs": diffs, "mean": mean, "margin": margin, "alpha": alpha}
    nan = math.nan
    undefined = {"se": nan, "ci": (nan, nan), "p_value": nan, "tost_p": nan, "equivalent": False,
                 "verdict": "inconclusive"}
    if n == 1:
        return out | undefined | {"sd": nan, "note": "one seed: no run-to-run spread to test "
                                                     "against; the difference is one run's"}
    df = n - 1
    sd = math.sqrt(math.fsum((d - mean) ** 2 for d in diffs) / df)
    # equal differences such as 0.7 - 0.6 and 0.8 - 0.7 leave a rounding sd near 1e-17, whose t
    # statistic would be meaningless; anything this far below the data's scale is no spread
    if sd <= 1e-12 * max(1.0, *map(abs, a), *map(abs, b)):
        return out | undefined | {"sd": 0.0, "note": f"sd = 0: all {n} seeds differ by the same "
                                  "amount, so the t-test is undefined; it says nothing about "
                                  "run-to-run spread"}
    se = sd / math.sqrt(n)
    half = float(scipy_stats.t.ppf(1 - alpha / 2, df)) * se
    ci = (mean - half, mean + half)
    p = float(2 * scipy_stats.t.sf(abs(mean) / se, df))
    # H0 mean <= -margin rejected for large t; H0 mean >= +margin for small t
    p_low = float(scipy_stats.t.sf((mean + margin) / se, df))
    p_high = float(scipy_stats.t.cdf((mean - margin) / se, df))
    tost_p = max(p_low, p_high)
    equivalent = tost_p < alpha
    return out | {"sd": sd, "se": se, "ci": ci, "p_value": p, "tost_p": tost_p,
                  "equivalent": equivalent, "verdict": _verdict(ci, equivalent), "note": None}


def _stack(correct_a: Sequence[Bits], correct_b: Sequence[Bits]) -> tuple[Tensor, Tensor]:
    """(seed, item) bool matrices of both arms; one clear line if they do not pair up."""
    if len(correct_a) != len(correct_b) or not correct_a:
        raise InputError(f"pairing seeds needs the same seeds for both arms; got {len(correct_a)} "
                         f"and {len(correct_b)}")
    sizes = {x.numel() for x in (*correct_a, *correct_b)}
    if len(sizes) != 1:
        raise InputError(f"every run must be evaluated on the same items; got {sorted(sizes)} "
                         "items")
    return (torch.stack([x.flatten().bool().cpu() for x in correct_a]),
            torch.stack([x.flatten().bool().cpu() for x in correct_b]))


def clustered_mcnemar(correct_a: Sequence[Bits], correct_b: Sequence[Bits]) -> dict:
    """McNemar's test with items as clusters of their per-seed pairs (Durkalski et al. 2003,
    "Analysis of clustered matched-pair data", Stat Med 22:2417).

    Every seed evaluates A and B on the same items, so item i is a cluster of ``n_seeds``
    matched pairs. With ``b_i`` the seeds in which A is right and B wrong on item i and ``c_i``
    the reverse, ``X = (sum b_i - sum c_i)^2 / sum (b_i - c_i)^2`` is chi-square with 1 degree of
    freedom under H0 (no difference in marginal accuracy), for many items. The denominator
    estimates the variance of ``B - C`` from the clusters themselves; the pooled test's
    ``B + C`` assumes every discordant pair is an independent coin. Their ratio, the design
    effect, says how much the clustering inflates that variance: 1 when no item is discordant
    in more than one seed, ``k`` when the same discordant items repeat in all ``k`` seeds. With
    one seed ``X`` is McNemar's statistic without continuity correction.

    Args:
        correct_a: per seed, A's per-item correctness.
        correct_b: per seed, B's, on the same items in the same order in every seed.

    Returns:
        ``{"b", "c", "statistic", "p_value", "n_items", "n_informative_items",
        "design_effect"}``: ``b`` and ``c`` summed over items and seeds; informative items are
        those with ``b_i + c_i > 0``; the design effect is NaN and the p-value 1 when nothing is
        discordant (or when every item's discordances cancel, ``b_i = c_i``).

    Warning:
        The chi-square reference is a large-sample one: it needs many informative items, and
        with a handful of them read the p-value as approximate.
    """
    a, b_ = _stack(correct_a, correct_b)
    b_i, c_i = (a & ~b_).sum(0).double(), (~a & b_).sum(0).double()
    b, c = int(b_i.sum()), int(c_i.sum())
    spread = float((b_i - c_i).square().sum())
    statistic = (b - c) ** 2 / spread if spread else 0.0
    return {"b": b, "c": c, "statistic": statistic,
            "p_value": float(scipy_stats.chi2.sf(statistic, 1)) if spread else 1.0,
            "n_items": a.shape[1], "n_informative_items": int(((b_i + c_i) > 0).sum()),
            "design_effect": spread / (b + c) if b + c else math.nan}


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (Holm 1979), in the order given.

    With the m p-values sorted, ``p_(1) <= ... <= p_(m)``, the adjusted value of the j-th is
    ``max_{i <= j} min(1, (m - i + 1) p_(i))``: rejecting where it is below alpha controls the
    family-wise error rate at alpha under any dependence between the tests, and is never less
    powerful than Bonferroni.

    Args:
        p_values: the family's p-values (a table's secondary comparisons).

    Returns:
        The adjusted p-values, each at its input's position.
    """
    ps = [float(p) for p in p_values]
    if not all(0 <= p <= 1 for p in ps):  # NaN fails too
        raise InputError(f"Holm adjusts p-values in [0, 1]; got {ps} (give NaN ones as 1.0)")
    m, adjusted, running = len(ps), [0.0] * len(ps), 0.0
    for rank, i in enumerate(sorted(range(m), key=ps.__getitem__)):
        running = max(running, min(1.0, (m - rank) * ps[i]))
        adjusted[i] = running
    return adjusted


def compare(correct_a: Sequence[Bits], correct_b: Sequence[Bits], *, margin: float,
            alpha: float = 0.05) -> dict:
    """Everything one comparison of two arms on one evaluation set needs, from per-item bits.

    The primary reading is ``seed_level`` (``seed_difference`` of the per-seed accuracies: the
    run is the unit). ``clustered`` (``clustered_mcnemar``) is the item-level robustness check.
    ``pooled_cmh`` (``mcnemar_pooled``) and ``per_seed`` McNemar tests are kept for comparison
    with the paper's single-seed test and earlier tables; the pooled one treats every
    (item, seed) pair as independent and is too confident when seeds repeat items.

    Args:
        correct_a: per seed, A's per-item correctness.
        correct_b: per seed, B's, on the same items in the same order in every seed.
        margin: the equivalence margin (``seed_difference``).
        alpha: the level of the tests.

    Returns:
        ``{"n_seeds", "n_items", "accuracy_a", "accuracy_b" (per seed), "discordance" (mean over
        seeds of the share of items the arms disagree on: ``cdist.power``'s pi), "seed_level",
        "clustered", "pooled_cmh", "per_seed"}``.
    """
    a, b = _stack(correct_a, correct_b)
    acc_a, acc_b = a.double().mean(1).tolist(), b.double().mean(1).tolist()
    pooled = mcnemar_pooled(list(a), list(b))
    pooled["note"] = ("treats every (item, seed) pair as independent; too confident where seeds "
                      "share items or training data; not for the primary reading")
    return {"n_seeds": a.shape[0], "n_items": a.shape[1], "accuracy_a": acc_a, "accuracy_b": acc_b,
            "discordance": float((a ^ b).double().mean()),
            "seed_level": seed_difference(acc_a, acc_b, margin=margin, alpha=alpha),
            "clustered": clustered_mcnemar(list(a), list(b)), "pooled_cmh": pooled,
            "per_seed": [mcnemar(x, y) for x, y in zip(a, b, strict=True)]}
