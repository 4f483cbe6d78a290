"""Head matching: which teacher head each relevant student head should learn from.

Three matchers, each returning a ``HeadMap`` (student heads x teacher heads, the matrix the choice was made
on, and the chosen pairs):

- ``ablation_matcher``, the paper's (SPEC section 1.3): mean-ablate each head alone; with P_s_base the
  student's answer probability, dP_s(h_s) = P_s_base - P_s_abl(h_s) and dP_t(h_t) = P_s_base - P_t_abl(h_t)
  (the teacher's ablated probability is read against the *student's* baseline, as the paper defines it);
  d(h_s, h_t) = |dP_s(h_s) - dP_t(h_t)|. Each student head maps to the teacher head(s) with the smallest d
  (many-to-one allowed; ties keep every minimiser).
- ``cka_matcher``: the linear CKA between each student head's and each teacher head's activations on the
  same prompts (``cdist.activations``); each student head maps to the most similar teacher head.
- ``random_matcher``: each student head gets a random teacher head (the paper's "Rand CKA" control).

``one_to_one=True`` (ablation and CKA matchers) instead solves the assignment problem (Hungarian algorithm,
``scipy.optimize.linear_sum_assignment``): each teacher head is used at most once and the total distance is
minimal (or total similarity maximal). With more student than teacher heads, the unassigned student heads
are left out of the pairs.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from cdist.cka import linear_cka
from cdist.types import Head, JsonRecord

__all__ = ["HeadMap", "ablation_matcher", "cka_matcher", "random_matcher"]


@dataclass(frozen=True, eq=False)
class HeadMap(JsonRecord):
    """Student heads paired with teacher heads.

    Attributes:
        pairs: (student head, teacher head) pairs; a student head may appear more than once (ties).
        student_heads: the rows of ``matrix``.
        teacher_heads: its columns.
        matrix: ``[student, teacher]`` float32: a distance (``kind="distance"``, smaller is closer) or a
            similarity (``kind="similarity"``, larger is closer); for the random matcher, zeros.
        kind: "distance" or "similarity".
        method: "ablation", "cka" or "random" (with "+one_to_one" when assigned one to one).
        student_model, teacher_model: names, for the record.
    """

    pairs: tuple[tuple[Head, Head], ...]
    student_heads: tuple[Head, ...]
    teacher_heads: tuple[Head, ...]
    matrix: Float[Tensor, "student teacher"]
    kind: str
    method: str
    student_model: str = ""
    teacher_model: str = ""

    def teachers_of(self, student: Head) -> tuple[Head, ...]:
        """The teacher heads a student head is paired with."""
        return tuple(t for s, t in self.pairs if s == student)

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "kind": self.kind,
            "student_model": self.student_model,
            "teacher_model": self.teacher_model,
            "student_heads": [str(h) for h in self.student_heads],
            "teacher_heads": [str(h) for h in self.teacher_heads],
            "matrix": [[round(float(v), 8) for v in row] for row in self.matrix],
            "pairs": [[str(s), str(t)] for s, t in self.pairs],
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> HeadMap:
        return cls(
            pairs=tuple((Head.parse(s), Head.parse(t)) for s, t in d["pairs"]),
            student_heads=tuple(Head.parse(h) for h in d["student_heads"]),
            teacher_heads=tuple(Head.parse(h) for h in d["teacher_heads"]),
            matrix=torch.tensor(d["matrix"], dtype=torch.float32).reshape(len(d["student_heads"]),
                                                                           len(d["teacher_heads"])),
            kind=d["kind"],
            method=d["method"],
            student_model=d.get("student_model", ""),
            teacher_model=d.get("teacher_model", ""),
        )


def _check(student_heads: Sequence[Head], teacher_heads: Sequence[Head]) -> None:
    if not student_heads or not teacher_heads:
        raise ValueError(f"matching needs student and teacher heads; got {len(student_heads)} student and "
                         f"{len(teacher_heads)} teacher heads (is a circuit empty?)")


def _pairs(matrix: Tensor, students, teachers, *, minimise: bool, one_to_one: bool) -> tuple:
    if one_to_one:
        rows, cols = linear_sum_assignment(matrix.double().numpy(), maximize=not minimise)
        return tuple((students[r], teachers[c]) for r, c in sorted(zip(rows.tolist(), cols.tolist(), strict=True)))
    best = matrix.min(1, keepdim=True).values if minimise else matrix.max(1, keepdim=True).values
    return tuple((students[r], teachers[c]) for r, c in (matrix == best).nonzero().tolist())


def ablation_matcher(
    student_base: float,
    student_ablated: Mapping[Head, float],
    teacher_ablated: Mapping[Head, float],
    *,
    one_to_one: bool = False,
    student_model: str = "",
    teacher_model: str = "",
) -> HeadMap:
    """The paper's matcher (module doc).

    Args:
        student_base: P_s_base, the student's mean answer probability on the matching prompts.
        student_ablated: relevant student head -> P_s_abl, its mean answer probability with that head
            mean-ablated (``head_ablation_scan(...)["prob_ablated"]``).
        teacher_ablated: teacher circuit head -> P_t_abl, the same for the teacher on the same prompts.
        one_to_one: assign each teacher head at most once (Hungarian) instead of the nearest one.
    """
    students, teachers = tuple(student_ablated), tuple(teacher_ablated)
    _check(students, teachers)
    d_s = torch.tensor([student_base - student_ablated[h] for h in students], dtype=torch.float64)
    d_t = torch.tensor([student_base - teacher_ablated[h] for h in teachers], dtype=torch.float64)
    matrix = (d_s[:, None] - d_t[None, :]).abs()
    pairs = _pairs(matrix, students, teachers, minimise=True, one_to_one=one_to_one)
    return HeadMap(pairs, students, teachers, matrix.float(), "distance",
                   "ablation" + ("+one_to_one" if one_to_one else ""), student_model, teacher_model)


def cka_matcher(
    student_z: Mapping[Head, Float[Tensor, "m d_s"]],
    teacher_z: Mapping[Head, Float[Tensor, "m d_t"]],
    *,
    one_to_one: bool = False,
    debiased: bool = True,
    student_model: str = "",
    teacher_model: str = "",
) -> HeadMap:
    """Match by representational similarity: CKA between every student and every teacher head.

    Args:
        student_z: relevant student head -> its activations on m prompts (``head_z_dataset``).
        teacher_z: teacher circuit head -> its activations on the same m prompts, in the same order.
        one_to_one: assign each teacher head at most once, maximising total similarity.
        debiased: use the debiased CKA (default: matching is a measurement, not a training signal, and the
            plain estimator's small-sample bias inflates every entry alike).
    """
    students, teachers = tuple(student_z), tuple(teacher_z)
    _check(students, teachers)
    with torch.no_grad():
        matrix = torch.tensor([[float(linear_cka(student_z[s], teacher_z[t], debiased=debiased)) for t in teachers]
                               for s in students], dtype=torch.float64)
    pairs = _pairs(matrix, students, teachers, minimise=False, one_to_one=one_to_one)
    return HeadMap(pairs, students, teachers, matrix.float(), "similarity",
                   "cka" + ("+one_to_one" if one_to_one else ""), student_model, teacher_model)


def random_matcher(
    student_heads: Sequence[Head], teacher_heads: Sequence[Head], *, seed: int,
    student_model: str = "", teacher_model: str = "",
) -> HeadMap:
    """Each student head paired with a teacher head drawn uniformly (with replacement) by ``random.Random(seed)``."""
    students, teachers = tuple(student_heads), tuple(teacher_heads)
    _check(students, teachers)
    rng = random.Random(seed)
    pairs = tuple((s, rng.choice(teachers)) for s in students)
    return HeadMap(pairs, students, teachers, torch.zeros(len(students), len(teachers)), "distance", "random",
                   student_model, teacher_model)
