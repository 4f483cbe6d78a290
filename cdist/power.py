"""Power for planning a table: how many seeds, and how many test items, a comparison needs.

The primary test of a table (``cdist.stats.seed_difference``) is a paired t-test over seeds. Its
power for a true mean difference ``effect`` and a per-run sd ``sd`` over ``n`` seeds comes from
the noncentral t distribution: under the alternative ``t = mean / (s / sqrt n)`` is noncentral t
with ``n - 1`` degrees of freedom and noncentrality ``effect / sd * sqrt(n)``.

A run's measured difference mixes two sources of spread (our variance model). Training: the
run's true difference varies around the arm's, with variance ``run_var`` (sigma^2_run). Items: on
``m`` test items, each item gives A - B in {-1, 0, 1}, nonzero with probability ``discordance``
(pi, the share of items on which the arms disagree) and with mean ``effect`` (delta), so its
variance is ``pi - delta^2`` and the mean over m items adds ``(pi - delta^2) / m``::

    Var(measured difference of one run) = sigma^2_run + (pi - delta^2) / m

(Exactly, when each run's own difference delta_r has variance pi - delta_r^2, the item term is
``(pi - delta^2 - sigma^2_run) / m``; the model drops ``sigma^2_run / m``, negligible beside
sigma^2_run.) More test items shrink only the second term; past the point where sigma^2_run
dominates, only more seeds help. ``run_variance`` estimates sigma^2_run from a pilot's per-seed
differences, ``alternative_discordance`` the pi of arms that truly differ by delta,
``design_power`` gives the power for m items and n seeds, and ``plan`` the seeds needed per choice
of m.

Warning:
    The model takes a run's items as fresh draws. Where every run is evaluated on the same items
    the item term is part shared between seeds, and where seeds share training items (as the
    shipped tables' did) sigma^2_run is understated: plan from a pilot whose seeds draw their
    own training items.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from scipy import stats as scipy_stats

from cdist.errors import InputError

__all__ = ["alternative_discordance", "design_power", "paired_t_power", "plan", "run_variance",
           "seeds_for_power"]


def _check(alpha: float, power: float | None = None) -> None:
    if not 0 < alpha < 1:
        raise InputError(f"alpha {alpha} is no significance level; give one in (0, 1), e.g. 0.05")
    if power is not None and not alpha < power < 1:
        raise InputError(f"target power {power} must lie in (alpha, 1), e.g. 0.8")


def paired_t_power(effect: float, sd: float, n: int, alpha: float = 0.05) -> float:
    """The two-sided paired t-test's power over ``n`` runs.

    ``P(|T| > t_{1-alpha/2, n-1})`` for T noncentral t with ``n - 1`` degrees of freedom and
    noncentrality ``effect / sd * sqrt(n)`` (both tails counted, as statsmodels'
    ``TTestPower``): the chance that a table of n seeds rejects "no difference" when runs of A
    beat runs of B by ``effect`` on average with per-run sd ``sd``.

    Args:
        effect: the true mean difference (accuracy points as a fraction, e.g. 0.03).
        sd: the sd of one run's measured difference (``sqrt`` of ``design_power``'s variance).
        n: the number of seeds, at least 2.
        alpha: the test's level.

    Returns:
        The power, ``alpha`` when ``effect`` is 0.
    """
    _check(alpha)
    if n < 2 or not (math.isfinite(sd) and sd > 0) or not math.isfinite(effect):
        raise InputError(f"power of a paired t-test needs n >= 2 runs and sd > 0; got n {n}, "
                         f"sd {sd}, effect {effect}")
    df, nc = n - 1, effect / sd * math.sqrt(n)
    crit = float(scipy_stats.t.ppf(1 - alpha / 2, df))
    return float(scipy_stats.nct.sf(crit, df, nc) + scipy_stats.nct.cdf(-crit, df, nc))


def seeds_for_power(effect: float, sd: float, power: float = 0.8, alpha: float = 0.05, *,
                    max_n: int = 10_000) -> int:
    """The smallest number of seeds (at least 2) whose paired t-test reaches ``power``
    (``paired_t_power``).

    Args:
        effect, sd, alpha: as ``paired_t_power``.
        power: the target power.
        max_n: give up beyond this many seeds.

    Returns:
        The number of seeds.
    """
    _check(alpha, power)
    for n in range(2, max_n + 1):
        if paired_t_power(effect, sd, n, alpha) >= power:
            return n
    raise InputError(f"{max_n} seeds do not reach power {power} for effect {effect} at sd {sd}; "
                     "plan for a larger effect or lower the sd (more test items)")


def _item_var(effect: float, discordance: float, n_items: int) -> float:
    if not 0 <= abs(effect) <= discordance <= 1 or n_items < 1:
        raise InputError(f"the variance model needs |effect| <= discordance <= 1 and n_items >= 1 "
                         f"(two arms cannot differ on more items than they disagree on); got "
                         f"effect {effect}, discordance {discordance}, n_items {n_items}")
    return (discordance - effect**2) / n_items


def run_variance(diffs: Sequence[float], discordance: float, n_items: int) -> dict:
    """sigma^2_run, the run-to-run variance of the true difference, from a pilot's per-seed
    differences: their sample variance less the item-sampling part ``(pi - d^2) / m`` of the
    variance model (module doc), with ``d`` the pilot's mean difference.

    Args:
        diffs: the pilot's per-seed differences (``seed_difference(...)["diffs"]``), 2 or more.
        discordance: the share of items the arms disagree on (``stats.compare``'s
            ``discordance``).
        n_items: the pilot's test items per run.

    Returns:
        ``{"run_var", "sample_var", "item_var", "floored", "note"}``: ``floored`` is True when the
        sample variance was below the item part alone and ``run_var`` was set to 0 (the pilot
        cannot tell run-to-run spread from none; ``note`` says so).
    """
    d = [float(x) for x in diffs]
    if len(d) < 2 or not all(math.isfinite(x) for x in d):
        raise InputError(f"a variance needs 2 or more finite per-seed differences; got {d}")
    mean = math.fsum(d) / len(d)
    sample_var = math.fsum((x - mean) ** 2 for x in d) / (len(d) - 1)
    item_var = _item_var(min(abs(mean), discordance), discordance, n_items)
    floored = sample_var < item_var
    note = (f"the seeds' variance {sample_var:.3g} is below the item-sampling part {item_var:.3g} "
            "alone: run_var floored at 0, the pilot cannot measure run-to-run spread"
            if floored else None)
    return {"run_var": max(0.0, sample_var - item_var), "sample_var": sample_var,
            "item_var": item_var, "floored": floored, "note": note}


def alternative_discordance(discordance: float, difference: float, effect: float) -> float:
    """pi under the alternative, from a pilot's: the pilot's two-way churn (its ``discordance``
    less its net ``difference``: items that flip each way in equal numbers, which a true
    difference does not remove) plus the ``|effect|`` items that a true difference flips one way;
    at most 1.

    The pilot's own pi cannot stand for it. Two nearly identical arms disagree on fewer items
    than the effect a table is sized for (the IOI pilot's circuit CE and CE + Align CKA: 1.1% of
    items, against a 2-point effect), and the variance model needs ``|delta| <= pi``; and arms
    that truly differ by ``effect`` disagree on the churn and on those items both.

    Args:
        discordance: the pilot's share of items the arms disagree on (``stats.compare``).
        difference: the pilot's mean difference (at most ``discordance`` in size).
        effect: the difference the table is sized for.

    Raises:
        InputError: ``|difference| > discordance``, or either outside [0, 1].
    """
    if not 0 <= abs(difference) <= discordance <= 1:
        raise InputError(f"a pilot's mean difference {difference} cannot exceed its discordance "
                         f"{discordance} (both shares of items, in [0, 1]); pass "
                         "stats.compare's discordance and seed-level mean")
    return min(1.0, discordance - abs(difference) + abs(effect))


def design_power(effect: float, run_var: float, discordance: float, n_items: int, n_seeds: int,
                 alpha: float = 0.05) -> float:
    """Power of the paired t-test over ``n_seeds`` seeds when each run is scored on ``n_items``
    test items: ``paired_t_power`` with the per-run sd of the variance model,
    ``sqrt(run_var + (discordance - effect^2) / n_items)`` (module doc).

    Args:
        effect: the true mean difference delta.
        run_var: sigma^2_run (``run_variance``).
        discordance: pi, the share of items the arms disagree on (``>= |effect|``).
        n_items: test items per run.
        n_seeds: seeds per arm.
        alpha: the test's level.

    Returns:
        The power.
    """
    if not (math.isfinite(run_var) and run_var >= 0):
        raise InputError(f"run_var {run_var} must be a variance (>= 0)")
    sd = math.sqrt(run_var + _item_var(effect, discordance, n_items))
    return paired_t_power(effect, sd, n_seeds, alpha)


def plan(effect: float, run_var: float, discordance: float, item_options: Sequence[int],
         power: float = 0.8, alpha: float = 0.05, max_seeds: int = 50) -> list[dict]:
    """Per number of test items, the fewest seeds whose table reaches ``power`` for a true
    difference ``effect`` (``design_power``).

    Args:
        effect, run_var, discordance, alpha: as ``design_power``.
        item_options: the numbers of test items to consider.
        power: the target power.
        max_seeds: the most seeds worth running.

    Returns:
        One ``{"n_items", "n_seeds", "power", "sd"}`` per option, in the order given:
        ``n_seeds`` None (and ``power`` that of ``max_seeds``) where ``max_seeds`` do not reach
        the target; ``sd`` is one run's, of the variance model.
    """
    _check(alpha, power)
    rows = []
    for m in item_options:
        by_n = [(n, design_power(effect, run_var, discordance, m, n, alpha))
                for n in range(2, max_seeds + 1)]
        reached = next(((n, p) for n, p in by_n if p >= power), None)
        n, p = reached if reached else (None, by_n[-1][1])
        rows.append({"n_items": m, "n_seeds": n, "power": p,
                     "sd": math.sqrt(run_var + _item_var(effect, discordance, m))})
    return rows
