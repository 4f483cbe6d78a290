"""The table's declared comparisons (``arms.COMPARISONS``), read from the runs' per-item results
alone, so that a table's ``per_item.json`` re-makes every statistic (``experiments/reanalyse.py``).

For each training regime, pair of arms and evaluation set (the test items, then each OOD set),
``cdist.stats.compare``: the mean over seeds of the per-seed accuracy difference with its t
interval, p-value, equivalence test at the declared margin and verdict (the run is the unit of
replication), Durkalski's clustered McNemar test (items as clusters across seeds) as robustness, and
the pooled CMH test earlier tables reported (not for reading).

Which is which: the primary comparison (the first of ``arms.COMPARISONS``, at the smallest regime,
on the test items) is read alone at ``alpha``. The family of secondaries, Holm-corrected together
(``holm_p``), is every "secondary" comparison on every set and regime plus the primary pair
everywhere else (its OOD sets, its other regimes). "check" comparisons (controls that should or
should not differ) are reported uncorrected.
"""

from __future__ import annotations

import math

from cdist import arms, stats
from cdist.pipeline.runs import unbits

__all__ = ["compare_arms"]


def _bits(run: dict, name: str):
    return unbits(run["test_full"] if name == "test" else run["ood"][name])


def compare_arms(runs: list[dict], *, margin: float, alpha: float) -> list[dict]:
    """Every declared comparison the runs allow (module doc), the primary first.

    Args:
        runs: records with ``arm``, ``train_items``, ``seed``, ``test_full`` and ``ood`` (per-item
            0/1 strings), as ``per_item.json`` keeps them.
        margin, alpha: the equivalence margin and the level of every test.

    Returns:
        One entry per (regime, comparison, evaluation set): ``regime``, ``a``, ``b``, ``set``,
        ``role`` ("primary", "secondary" or "check"), ``seeds``, ``stats.compare``'s record, and
        for the secondary family ``holm_p`` and ``holm_verdict`` (the verdict once a difference
        must clear the correction).
    """
    regimes = sorted({r["train_items"] for r in runs})
    entries = []
    for regime in regimes:
        by_arm: dict[str, dict[int, dict]] = {}
        for r in runs:
            if r["train_items"] == regime:
                by_arm.setdefault(r["arm"], {})[r["seed"]] = r
        for c in arms.COMPARISONS:
            if c.a not in by_arm or c.b not in by_arm:
                continue
            seeds = sorted(set(by_arm[c.a]) & set(by_arm[c.b]))
            first = by_arm[c.a][seeds[0]]
            for name in ("test", *first["ood"]):
                role = c.role
                if role == "primary" and (name != "test" or regime != regimes[0]):
                    role = "secondary"
                record = stats.compare([_bits(by_arm[c.a][s], name) for s in seeds],
                                       [_bits(by_arm[c.b][s], name) for s in seeds],
                                       margin=margin, alpha=alpha)
                entries.append({"regime": f"n{regime}", "a": c.a, "b": c.b, "set": name,
                                "role": role, "seeds": seeds, **record})
    entries.sort(key=lambda e: e["role"] != "primary")
    family = [e for e in entries if e["role"] == "secondary"]
    p = [e["seed_level"]["p_value"] for e in family]
    # an undefined p (one seed, or no spread) counts as no evidence
    for e, adjusted in zip(family, stats.holm([1.0 if math.isnan(x) else x for x in p]),
                           strict=True):
        e["holm_p"] = adjusted
        e["holm_verdict"] = _corrected(e["seed_level"], adjusted, alpha)
    return entries


def _corrected(seed_level: dict, holm_p: float, alpha: float) -> str:
    """The verdict once a difference must clear Holm's correction: a difference that does not is
    read as no difference shown (equivalent, if the equivalence test holds; else inconclusive)."""
    verdict = seed_level["verdict"]
    if holm_p < alpha or verdict in ("equivalent", "inconclusive"):
        return verdict
    return "equivalent" if seed_level["equivalent"] else "inconclusive"
