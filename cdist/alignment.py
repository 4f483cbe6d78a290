"""Can a head map teach anything? Diagnostics of the alignment target before training.

CKA aligns a student head's ``z`` with a teacher head's ``z`` across the items of a batch. That
carries task information only if the teacher head's ``z`` *varies* with the item at the position it
is read: a head read where it does nothing (an object binder read at the last token, say) is
nearly the same vector for every item, so CKA with it is noise, the plain estimator's small-batch
bias (``cdist.cka``) included. ``diagnose`` measures, for every pair on held-out items:

- ``teacher_variation`` and ``student_variation``: the spread of the head's ``z`` across items
  relative to its size, sqrt(mean_i |z_i - mean z|^2) / mean_i |z_i| (0 for a constant, about 1 for
  zero-mean noise). Below ``MIN_VARIATION`` the target is flagged: the threshold sits well above
  the spread of a head read where it does not work and well below that of a circuit head read at
  its own position, which varies on the scale of its norm.
- ``cka_debiased``: the debiased CKA of the pair on all the items (about 0 when unrelated).
- ``cka_batch`` and ``cka_batch_shuffled``: the plain CKA that training sees, averaged over batches
  of ``batch_size`` items, with the teacher's rows in item order and permuted; their gap is what the
  pairing of items adds over the small-batch bias.

and for the map, the teacher heads that more than half the student heads are sent to
(``HeadMap.crowded``). Each problem is also raised as an ``AlignmentWarning`` naming the pair and
the fix.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

import cdist
from cdist.activations import head_z_dataset
from cdist.cka import linear_cka
from cdist.matching import HeadMap
from cdist.models import HookedTransformer

__all__ = ["MIN_VARIATION", "AlignmentWarning", "diagnose", "variation"]

MIN_VARIATION = 0.01


class AlignmentWarning(UserWarning):
    """A head map whose alignment cannot carry task information (a flat target, or a crowded teacher
    head)."""


def variation(z: Float[Tensor, "m d_head"]) -> float:
    """Spread of ``z`` across its rows relative to their mean norm (module doc); 0 for no rows'
    worth of spread."""
    z = z.double()
    size = z.norm(dim=1).mean()
    if z.shape[0] < 2 or size == 0:
        return 0.0
    return float((z - z.mean(0)).square().sum(1).mean().sqrt() / size)


def _batch_cka(x: Tensor, y: Tensor, batch_size: int) -> float:
    starts = range(0, len(x) - batch_size + 1, batch_size)
    chunks = [(x[i : i + batch_size], y[i : i + batch_size]) for i in starts]
    return sum(float(linear_cka(a, b)) for a, b in chunks) / len(chunks) if chunks else float("nan")


def _callers_level(frame) -> int:
    """The ``stacklevel``, for a warning raised in ``frame``, of the first frame outside cdist,
    torch and the decorators that may wrap cdist's functions (jaxtyping's checks), so that the
    warning names the user's line."""
    import jaxtyping

    inside = tuple(str(Path(m.__file__).parent) for m in (cdist, torch, jaxtyping))
    level = 1
    while frame is not None and frame.f_code.co_filename.startswith(inside):
        frame, level = frame.f_back, level + 1
    return level


def diagnose(
    student: HookedTransformer,
    teacher: HookedTransformer,
    head_map: HeadMap,
    items,
    *,
    min_variation: float = MIN_VARIATION,
    batch_size: int = 32,
    seed: int = 0,
    warn: bool = True,
) -> dict:
    """Measure every pair of ``head_map`` on ``items`` (held-out task items) and flag what cannot
    teach.

    Args:
        student, teacher: HookedTransformers on one tokenizer.
        head_map: the pairs, with their positions.
        items: held-out task items with the pairs' position columns (at least 4 for the debiased
            CKA).
        min_variation: a teacher head varying less than this across items is a flat target.
        batch_size: the m of the plain CKA that training sees.
        seed: the permutation of ``cka_batch_shuffled``.
        warn: also raise each flag as an ``AlignmentWarning``.

    Returns:
        ``{"pairs": [per-pair record], "crowded": {teacher head: n students}, "flags": [messages],
        "min_variation", "items"}``.
    """
    with torch.no_grad():
        s_sites, t_sites = head_map.sites()
        zs = head_z_dataset(student, items, s_sites)
        zt = head_z_dataset(teacher, items, t_sites)
    perm = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed))
    records, flags = [], []
    for p in head_map.pairs:
        x, y = zs[(p.student, p.student_position)], zt[(p.teacher, p.teacher_position)]
        rec = {"pair": str(p), **p.to_dict(),
               "teacher_variation": variation(y), "student_variation": variation(x),
               "cka_debiased": float(linear_cka(x, y, debiased=True)),
               "cka_batch": _batch_cka(x, y, batch_size),
               "cka_batch_shuffled": _batch_cka(x, y[perm], batch_size),
               "flat_target": variation(y) < min_variation}
        records.append(rec)
        if rec["flat_target"]:
            flags.append(f"flat alignment target {p}: the teacher head varies by "
                         f"{rec['teacher_variation']:.2g} of its norm across items "
                         f"(< {min_variation}), so CKA with it teaches nothing; read the pair "
                         "where the teacher head works (HeadMap.placed with "
                         "matching.circuit_positions or matching.work_positions) or leave it out")
    crowded = head_map.crowded()
    n_students = len({p.student for p in head_map.pairs})
    for t, n in crowded.items():
        flags.append(f"head map {head_map.method} sends {n} of {n_students} student heads to "
                     f"teacher head {t}; most of the student's circuit would copy one head: "
                     "try a one-to-one matcher (--matchers ablation-1to1 "
                     "ablation-baseline-1to1 cka-1to1 on the command line; one_to_one=True "
                     "in matching's functions)")
    if warn:
        for message in flags:
            warnings.warn(message, AlignmentWarning,
                          stacklevel=_callers_level(sys._getframe()))
    return {"pairs": records, "crowded": {str(t): n for t, n in crowded.items()}, "flags": flags,
            "min_variation": min_variation, "items": len(items)}
