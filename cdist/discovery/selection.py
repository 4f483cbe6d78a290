"""Head selection: which heads of a scan count as a circuit's.

A scan scores every head; a circuit keeps the few whose effect is large and real. ``select_heads``
takes the top ``k`` of a ranking whose effect clears two bars:

- ``min_effect``: a fixed size, or the scan's own item-to-item noise (``NOISE_Z`` standard
  errors), so that a head is not kept for an effect that resampling the items could erase;
- ``min_share`` (ours): a floor relative to the largest effect of the scan (or of a larger
  ``reference``): a head whose effect is under that share of the largest is not kept, however
  steady it is. The noise rule alone keeps such heads: on SmolLM2 a search kept heads whose path
  effects were -1e-6, -7e-6 and -7e-5 against a value fetcher's -0.019 (their standard errors were
  smaller still), and the 8-head circuit they were part of kept 0.067 accuracy on its own.

``ranked_circuit`` makes a one-group ``Circuit`` of the top heads, the form of mean-ablation
circuits (Wadhwa et al. 2025) and of students' circuits.

A leaf of ``cdist.discovery``: it reads scans and imports no other discovery module, so the scans,
the entity-tracking search and ``find_circuit`` can all use it.
"""

from __future__ import annotations

import math

import torch

from cdist.errors import InputError
from cdist.types import Circuit, Head, HeadScores, Scan

__all__ = ["MIN_SHARE", "NOISE_Z", "largest_effect", "ranked_circuit", "select_heads"]


# How many standard errors (over the items) an effect must clear to count, under
# ``min_effect="noise"``: about a 2.5% one-sided false-positive rate per head under a normal
# approximation.
NOISE_Z = 2.0
# The discovery rules' default floor (``DiscoveryConfig.min_share``): a head's effect must be at
# least 1% of the largest one it is measured against. The heads it drops on SmolLM2 were 0.005% to
# 0.4% of the largest; a head at 1% of a value fetcher's effect still moves the answer's
# probability by a measurable amount.
MIN_SHARE = 0.01


def largest_effect(scores: Scan | HeadScores) -> float:
    """The largest effect of any head in the important direction (a probability drop, or minus a
    relative change); 0 when no head moves the metric that way. NaN scores (heads a scan did not
    measure) are left out."""
    if isinstance(scores, Scan):
        scores = scores.ranking()
    flat = scores.scores.detach().flatten().double().cpu()
    flat = flat if scores.higher_is_important else -flat
    flat = flat[~torch.isnan(flat)]
    return max(0.0, float(flat.max())) if flat.numel() else 0.0


def select_heads(scores: Scan | HeadScores, k: int, min_effect: float | str = 0.0,
                 min_share: float = 0.0, *, reference: float = 0.0) -> tuple[Head, ...]:
    """The up-to-``k`` most important heads whose score clears ``min_effect`` and ``min_share``,
    most important first.

    A ``Scan`` is ranked by its own metric (``Scan.ranking``).

    ``min_effect`` as a number: for scores where low is important (``higher_is_important=False``,
    path patching's relative change) a head qualifies when its score is at most ``-min_effect``;
    otherwise when it is at least ``min_effect``. With ``min_effect=0`` a head must still move the
    metric in the important direction (not exactly 0). ``min_effect="noise"`` (a ``Scan`` with a
    ``<metric>_se`` metric) asks each head's effect to be at least ``NOISE_Z`` of its own standard
    errors over the items in the important direction, so no head is kept whose effect is within the
    item-to-item noise. NaN scores (heads a scan did not measure) never qualify.

    ``min_share`` (in [0, 1]; 0 turns it off) is a floor besides: a head's effect in the important
    direction must be at least ``min_share`` times the largest such effect of the scan, or of
    ``reference`` when that is larger (``entity_tracking_circuit`` passes the largest effect of the
    groups searched before, in the same unit). With ``min_share=1`` only the largest effect
    qualifies.
    """
    if not 0 <= min_share <= 1:
        raise InputError(f"min_share={min_share!r}; give a share of the largest effect in [0, 1]")
    if not reference >= 0 or math.isinf(reference):
        raise InputError(f"reference={reference!r}; give the largest effect to measure against, "
                         ">= 0")
    threshold = None
    if isinstance(min_effect, str):
        if min_effect != "noise":
            raise InputError(f"min_effect={min_effect!r}; give a number or 'noise'")
        se_name = f"{scores.metric}_se" if isinstance(scores, Scan) else None
        if se_name is None or se_name not in scores.metrics:
            raise InputError("min_effect='noise' needs a Scan with standard errors "
                             f"({se_name or 'HeadScores have none'}); give a number instead")
        if scores.n_items < 2:
            raise InputError("min_effect='noise' needs a scan over 2 or more items "
                             "(one item has no standard error); give a number instead")
        threshold = NOISE_Z * scores[se_name]
    if isinstance(scores, Scan):
        scores = scores.ranking()
    floor = min_share * max(reference, largest_effect(scores))
    out: list[Head] = []
    # Down the whole ranking: with per-head noise bars a large but noisy effect is passed over and
    # the next head that clears its own bar is taken, so a pre-filtered scan that never measured
    # the noisy head selects what the exact scan does.
    for h in scores.top(scores.scores.numel()):
        if len(out) == k:
            break
        s = scores[h]
        bar = float(threshold[h.layer, h.head]) if threshold is not None else min_effect
        effect = s if scores.higher_is_important else -s
        ok = effect >= bar and effect >= floor
        if ok and s != 0 and s == s:  # s == s drops NaN
            out.append(h)
    return tuple(out)


def ranked_circuit(
    scores: Scan | HeadScores, n: int, *, position: str = "pos_last", model: str = "",
    method: str = "", min_effect: float = 0.0, min_share: float = 0.0,
) -> Circuit:
    """A one-group circuit of the top-``n`` heads of a scan (theory of mind's circuits,
    students' circuits) that clear ``min_effect`` and ``min_share`` (``select_heads``).
    """
    if isinstance(scores, Scan):
        method, scores = method or scores.method, scores.ranking()
    heads = select_heads(scores, n, min_effect, min_share)
    return Circuit({"circuit": heads}, positions={"circuit": position},
                   scores={h: scores[h] for h in heads}, model=model,
                   method=method or scores.metric)
