"""Head selection: which heads of a scan count as a circuit's.

A scan scores every head; a circuit keeps the few whose effect is large and real. ``select_heads``
takes the top ``k`` of a ranking whose effect clears a threshold, either a fixed size or the scan's
own item-to-item noise (``NOISE_Z`` standard errors), so that a head is not kept for an effect that
resampling the items could erase. ``ranked_circuit`` makes a one-group ``Circuit`` of the top heads,
the form of mean-ablation circuits (Wadhwa et al. 2025) and of students' circuits.

A leaf of ``cdist.discovery``: it reads scans and imports no other discovery module, so the scans,
the entity-tracking search and ``find_circuit`` can all use it.
"""

from __future__ import annotations

from cdist.errors import InputError
from cdist.types import Circuit, Head, HeadScores, Scan

__all__ = ["NOISE_Z", "ranked_circuit", "select_heads"]


# How many standard errors (over the items) an effect must clear to count, under
# ``min_effect="noise"``: about a 2.5% one-sided false-positive rate per head under a normal
# approximation.
NOISE_Z = 2.0


def select_heads(scores: Scan | HeadScores, k: int,
                 min_effect: float | str = 0.0) -> tuple[Head, ...]:
    """The up-to-``k`` most important heads whose score clears ``min_effect``, most important first.

    A ``Scan`` is ranked by its own metric (``Scan.ranking``).

    ``min_effect`` as a number: for scores where low is important (``higher_is_important=False``,
    path patching's relative change) a head qualifies when its score is at most ``-min_effect``;
    otherwise when it is at least ``min_effect``. With ``min_effect=0`` a head must still move the
    metric in the important direction (not exactly 0). ``min_effect="noise"`` (a ``Scan`` with a
    ``<metric>_se`` metric) asks each head's effect to be at least ``NOISE_Z`` of its own standard
    errors over the items in the important direction, so no head is kept whose effect is within the
    item-to-item noise. NaN scores (heads a scan did not measure) never qualify.
    """
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
    out: list[Head] = []
    # Down the whole ranking: with per-head noise bars a large but noisy effect is passed over and
    # the next head that clears its own bar is taken, so a pre-filtered scan that never measured
    # the noisy head selects what the exact scan does.
    for h in scores.top(scores.scores.numel()):
        if len(out) == k:
            break
        s = scores[h]
        bar = float(threshold[h.layer, h.head]) if threshold is not None else min_effect
        ok = s <= -bar if not scores.higher_is_important else s >= bar
        if ok and s != 0 and s == s:  # s == s drops NaN
            out.append(h)
    return tuple(out)


def ranked_circuit(
    scores: Scan | HeadScores, n: int, *, position: str = "pos_last", model: str = "",
    method: str = "", min_effect: float = 0.0,
) -> Circuit:
    """A one-group circuit of the top-``n`` heads of a scan (theory of mind's circuits,
    students' circuits).
    """
    if isinstance(scores, Scan):
        method, scores = method or scores.method, scores.ranking()
    heads = select_heads(scores, n, min_effect)
    return Circuit({"circuit": heads}, positions={"circuit": position},
                   scores={h: scores[h] for h in heads}, model=model,
                   method=method or scores.metric)
