"""Head matching: which teacher head each relevant student head should learn from, and where to read
the pair.

Three matchers, each returning a ``HeadMap`` (student heads x teacher heads, the matrix the choice
was made on, and the chosen ``HeadPair``s):

- ``ablation_matcher``, the paper's (Wadhwa, Amir & Wallace, "Circuit Distillation", arXiv
  2509.25002): mean-ablate each head alone; with P_s_base the student's answer probability,
  dP_s(h_s) = P_s_base - P_s_abl(h_s) and dP_t(h_t) = P_s_base - P_t_abl(h_t) (the teacher's
  ablated probability is read against the *student's* baseline, as the paper defines it);
  d(h_s, h_t) = |dP_s(h_s) - dP_t(h_t)|. Each student head maps to the teacher head(s) with the
  smallest d (many-to-one allowed; ties keep every minimiser).
  ``normalise="baseline"`` is our variant: each model's drop is read against *its own* baseline and
  divided by it, dP(h) = (P_base - P_abl(h)) / P_base, the share of the model's answer probability
  the head carries. With a much stronger teacher the paper's rule compares a weak student's small
  drops with the teacher's (P_s_base - P_t_abl), which is negative for every teacher head that
  ablation does not break, so most student heads go to the one teacher head that does. Relative
  drops compare like with like.
- ``cka_matcher``: the linear CKA between each student head's and each teacher head's activations on
  the same prompts (``cdist.activations``), each pair read at the teacher head's position; each
  student head maps to the most similar teacher head.
- ``random_matcher``: each student head gets a different random teacher head, drawn without
  replacement from the teacher heads not excluded (the paper's "Rand CKA" control;
  ``random_control`` builds it from an aligned map in the aligned map's shape, excluding the
  teacher circuit, and keeping each pair's positions).

``one_to_one=True`` (ablation and CKA matchers) instead solves the assignment problem (Hungarian
algorithm, ``scipy.optimize.linear_sum_assignment``): each teacher head is used at most once and the
total distance is minimal (or total similarity maximal). With more student than teacher heads, the
unassigned student heads are left out of the pairs.

Positions: a pair is read where its teacher head does its work: a head read where it does nothing
is nearly constant across items, and aligning with a constant teaches nothing. ``circuit_positions``
gives each head of a path-patched circuit its group's position; ``work_positions`` finds, for heads
of a ranked circuit, the position column where ablating the head alone hurts most;
``HeadMap.placed`` writes them into the pairs (``HeadMap.at`` puts every pair at one column). The
ablation and random matchers leave every pair at ``pos_last`` until placed.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from jaxtyping import Float
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from cdist.activations import Site
from cdist.cka import linear_cka
from cdist.discovery.ablation import position_drops
from cdist.errors import InputError
from cdist.models import HookedTransformer, check_heads
from cdist.types import Circuit, Head, HeadPair, Scan

__all__ = ["HeadMap", "ablation_matcher", "ablation_matcher_from_scans", "circuit_positions",
           "cka_matcher", "position_columns", "random_control", "random_matcher", "work_positions"]


@dataclass(frozen=True, eq=False)
class HeadMap:
    """Student heads paired with teacher heads, each pair with the positions it is read at.

    Attributes:
        pairs: ``HeadPair``s; a student head may appear more than once (ties, or many teacher
            heads).
        student_heads: the rows of ``matrix``.
        teacher_heads: its columns.
        matrix: ``[student, teacher]`` float32: a distance (``kind="distance"``, smaller is closer)
            or a similarity (``kind="similarity"``, larger is closer); for the random matcher,
            zeros.
        kind: "distance" or "similarity".
        method: "ablation", "ablation-baseline", "cka" or "random" (with "+one_to_one" when
            assigned one to one).
        student_model, teacher_model: names, for the record.
    """

    pairs: tuple[HeadPair, ...]
    student_heads: tuple[Head, ...]
    teacher_heads: tuple[Head, ...]
    matrix: Float[Tensor, "student teacher"]
    kind: str
    method: str
    student_model: str = ""
    teacher_model: str = ""

    def teachers_of(self, student: Head) -> tuple[Head, ...]:
        """The teacher heads a student head is paired with."""
        return tuple(p.teacher for p in self.pairs if p.student == student)

    def sites(self) -> tuple[list[Site], list[Site]]:
        """The distinct (head, position) sites the pairs read: student side, teacher side."""
        return (list(dict.fromkeys((p.student, p.student_position) for p in self.pairs)),
                list(dict.fromkeys((p.teacher, p.teacher_position) for p in self.pairs)))

    def placed(self, teacher_positions: Mapping[Head, str],
               student_positions: Mapping[Head, str] | None = None) -> HeadMap:
        """The same pairs, each read at its teacher head's position (``teacher_positions``) on both
        sides, unless ``student_positions`` names the student side."""
        missing = sorted(str(p.teacher) for p in self.pairs if p.teacher not in teacher_positions)
        if missing:
            raise InputError(f"no position for teacher heads {missing}; "
                             "give every paired teacher head one")
        student_positions = student_positions or {}
        return replace(self, pairs=tuple(
            replace(p, teacher_position=teacher_positions[p.teacher],
                    student_position=student_positions.get(p.student, teacher_positions[p.teacher]))
            for p in self.pairs))

    def at(self, position: str) -> HeadMap:
        """The same pairs, every one read at ``position`` on both sides (one position for every
        pair, whatever the heads' own)."""
        return replace(self, pairs=tuple(replace(p, student_position=position,
                                                 teacher_position=position)
                                         for p in self.pairs))

    def check(self, student=None, teacher=None, columns=None, where: str = "the head map",
              fix: str = "give each pair once") -> None:
        """Refuse a map that cannot be trained on as it stands (a hand-edited file, say): a pair
        given twice (its CKA term would count twice), heads outside ``student`` or ``teacher``
        (models or checkpoint configs), positions outside ``columns`` (the items' position
        columns). Each check runs where its argument is given.

        Raises:
            InputError: naming ``where``, the first pairs at fault, and ``fix``.
        """
        seen = Counter(self.pairs)
        twice = [str(p) for p, n in seen.items() if n > 1]
        if twice:
            raise InputError(f"{where} repeats the pairs {twice[:3]}; {fix}")
        for model, role in ((student, "student"), (teacher, "teacher")):
            if model is not None:
                check_heads(model, [getattr(p, role) for p in self.pairs],
                            f"{where}'s {role} heads", fix)
        if columns is not None:
            unknown = sorted({c for p in self.pairs for c in (p.student_position,
                                                              p.teacher_position)}
                             - set(columns))
            if unknown:
                raise InputError(f"{where} reads positions {unknown}, which the task's items do "
                                 f"not have; {fix}")

    def crowded(self) -> dict[Head, int]:
        """Teacher heads that more than half of the paired student heads map to, with how many do.

        The paper's matcher does this with a much stronger teacher; aligning most of a student's
        circuit with one teacher head is rarely what a user wants, so ``cdist.alignment`` flags it.
        """
        students = {p.student for p in self.pairs}
        counts = Counter(t for _, t in {(p.student, p.teacher) for p in self.pairs})
        return {t: n for t, n in counts.items() if len(students) > 1 and n > len(students) / 2}

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "kind": self.kind,
            "student_model": self.student_model,
            "teacher_model": self.teacher_model,
            "student_heads": [str(h) for h in self.student_heads],
            "teacher_heads": [str(h) for h in self.teacher_heads],
            "matrix": [[round(float(v), 8) for v in row] for row in self.matrix],
            "pairs": [p.to_dict() for p in self.pairs],
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> HeadMap:
        matrix = torch.tensor(d["matrix"], dtype=torch.float32)
        shape = (len(d["student_heads"]), len(d["teacher_heads"]))
        if matrix.numel() != shape[0] * shape[1]:
            raise InputError(f"a head map's matrix has {matrix.numel()} entries, not one per "
                             f"student and teacher head ({shape[0]} x {shape[1]})")
        return cls(
            pairs=tuple(HeadPair.from_dict(p) for p in d["pairs"]),
            student_heads=tuple(Head.parse(h) for h in d["student_heads"]),
            teacher_heads=tuple(Head.parse(h) for h in d["teacher_heads"]),
            matrix=matrix.reshape(shape),
            kind=d["kind"],
            method=d["method"],
            student_model=d.get("student_model", ""),
            teacher_model=d.get("teacher_model", ""),
        )


def _check(student_heads: Sequence[Head], teacher_heads: Sequence[Head]) -> None:
    if not student_heads or not teacher_heads:
        raise InputError("matching needs student and teacher heads; "
                         f"got {len(student_heads)} student and {len(teacher_heads)} teacher heads "
                         "(is a circuit empty?)")


def _pairs(
    matrix: Tensor, students, teachers, *, minimise: bool, one_to_one: bool
) -> tuple[HeadPair, ...]:
    if one_to_one:
        rows, cols = linear_sum_assignment(matrix.double().numpy(), maximize=not minimise)
        chosen = sorted(zip(rows.tolist(), cols.tolist(), strict=True))
    else:
        best = (matrix.min(1, keepdim=True).values if minimise
                else matrix.max(1, keepdim=True).values)
        chosen = (matrix == best).nonzero().tolist()
    return tuple(HeadPair(students[r], teachers[c]) for r, c in chosen)


def ablation_matcher(
    student_base: float,
    student_ablated: Mapping[Head, float],
    teacher_ablated: Mapping[Head, float],
    *,
    teacher_base: float | None = None,
    normalise: str | None = None,
    one_to_one: bool = False,
    student_model: str = "",
    teacher_model: str = "",
) -> HeadMap:
    """The paper's matcher, or its normalised variant (module doc).

    Args:
        student_base: P_s_base, the student's mean answer probability on the matching prompts.
        student_ablated: relevant student head -> P_s_abl, its mean answer probability with that
            head mean-ablated (``head_ablation_scan(...)["prob_ablated"]``).
        teacher_ablated: teacher circuit head -> P_t_abl, the same for the teacher on the same
            prompts.
        teacher_base: P_t_base, the teacher's own answer probability; needed by
            ``normalise="baseline"``.
        normalise: None (the paper's rule) or "baseline" (each model's relative drop against its
            own baseline).
        one_to_one: assign each teacher head at most once (Hungarian) instead of the nearest one.
    """
    students, teachers = tuple(student_ablated), tuple(teacher_ablated)
    _check(students, teachers)
    if normalise not in (None, "baseline"):
        raise InputError(f"normalise={normalise!r}; choose None (the paper's rule) or 'baseline'")
    s_abl = torch.tensor([student_ablated[h] for h in students], dtype=torch.float64)
    t_abl = torch.tensor([teacher_ablated[h] for h in teachers], dtype=torch.float64)
    if normalise is None:
        d_s, d_t = student_base - s_abl, student_base - t_abl
    else:
        if teacher_base is None or teacher_base <= 0 or student_base <= 0:
            raise InputError("normalise='baseline' needs positive student_base and teacher_base "
                             "probabilities")
        d_s, d_t = (student_base - s_abl) / student_base, (teacher_base - t_abl) / teacher_base
    matrix = (d_s[:, None] - d_t[None, :]).abs()
    pairs = _pairs(matrix, students, teachers, minimise=True, one_to_one=one_to_one)
    method = "ablation" + ("-baseline" if normalise else "") + ("+one_to_one" if one_to_one else "")
    return HeadMap(pairs, students, teachers, matrix.float(), "distance", method, student_model,
                   teacher_model)


def ablation_matcher_from_scans(
    student_scan: Scan,
    teacher_scan: Scan,
    student_heads: Sequence[Head],
    teacher_heads: Sequence[Head],
    **kwargs,
) -> HeadMap:
    """``ablation_matcher`` read off two mean-ablation scans (``head_ablation_scan``) of the same
    items: each model's base probability and its circuit heads' ablated ones; ``kwargs`` as
    ``ablation_matcher``'s (``normalise``, ``one_to_one``, model names)."""

    def base(scan: Scan) -> float:  # ablated + drop, the same for every head
        return float(scan["prob_ablated"][0, 0] + scan["prob_drop"][0, 0])

    def ablated(scan: Scan, heads: Sequence[Head]) -> dict[Head, float]:
        return {h: float(scan["prob_ablated"][h.layer, h.head]) for h in heads}

    return ablation_matcher(base(student_scan), ablated(student_scan, student_heads),
                            ablated(teacher_scan, teacher_heads), teacher_base=base(teacher_scan),
                            **kwargs)


def cka_matcher(
    student_z: Mapping,
    teacher_z: Mapping,
    *,
    one_to_one: bool = False,
    debiased: bool = True,
    student_model: str = "",
    teacher_model: str = "",
) -> HeadMap:
    """Match by representational similarity: CKA between every student and every teacher head.

    Args:
        student_z: student activations on m prompts (``head_z_dataset``), keyed by
            ``(head, column)`` sites or by bare heads (read at one position).
        teacher_z: teacher activations on the same m prompts, in the same order, keyed the same way.
            With sites, student head s is compared with teacher site (t, column) through
            ``student_z[(s, column)]``, so ``student_z`` must hold every student head at every
            teacher column; the pairs keep the column.
        one_to_one: assign each teacher head at most once, maximising total similarity.
        debiased: use the debiased CKA (default: matching is a measurement, not a training signal,
            and the plain estimator's small-sample bias inflates every entry alike).
    """
    def split(key) -> Site:
        return (key, "pos_last") if isinstance(key, Head) else key

    def read(z: Mapping, site: Site) -> Tensor:
        return z[site[0]] if site[0] in z else z[site]

    students = tuple(dict.fromkeys(split(k)[0] for k in student_z))
    t_sites = [split(k) for k in teacher_z]
    teachers = tuple(h for h, _ in t_sites)
    _check(students, teachers)
    if len(set(teachers)) != len(teachers):
        raise InputError("each teacher head may appear at one position only in teacher_z")
    try:
        with torch.no_grad():
            matrix = torch.tensor([[float(linear_cka(read(student_z, (s, col)),
                                                     read(teacher_z, (t, col)),
                                                     debiased=debiased)) for t, col in t_sites]
                                   for s in students], dtype=torch.float64)
    except KeyError as missing:
        raise InputError(f"student_z lacks the site {missing}; "
                         "read every student head at every teacher head's position") from None
    position = dict(t_sites)
    chosen = _pairs(matrix, students, teachers, minimise=False, one_to_one=one_to_one)
    pairs = tuple(HeadPair(p.student, p.teacher, position[p.teacher], position[p.teacher])
                  for p in chosen)
    return HeadMap(pairs, students, teachers, matrix.float(), "similarity",
                   "cka" + ("+one_to_one" if one_to_one else ""), student_model, teacher_model)


def random_matcher(
    student_heads: Sequence[Head],
    teacher_heads: Sequence[Head],
    *,
    seed: int,
    exclude: Iterable[Head] = (),
    student_model: str = "",
    teacher_model: str = "",
) -> HeadMap:
    """Each student head paired with a different teacher head, drawn without replacement by
    ``random.Random(seed)`` from ``teacher_heads`` minus ``exclude``; every pair at ``pos_last``."""
    students = tuple(student_heads)
    excluded = set(exclude)
    pool = tuple(h for h in teacher_heads if h not in excluded)
    _check(students, pool)
    if len(pool) < len(students):
        raise InputError(f"{len(students)} student heads need as many distinct random teacher "
                         f"heads; only {len(pool)} remain after excluding {len(excluded)} "
                         "(use a larger pool)")
    drawn = random.Random(seed).sample(pool, len(students))
    pairs = tuple(HeadPair(s, t) for s, t in zip(students, drawn, strict=True))
    return HeadMap(pairs, students, pool, torch.zeros(len(students), len(pool)), "distance",
                   "random", student_model, teacher_model)


def random_control(head_map: HeadMap, teacher_heads: Sequence[Head], *, seed: int,
                   exclude: Iterable[Head] = ()) -> HeadMap:
    """The "CE + Rand CKA" map of an aligned ``head_map``, of its shape: each distinct aligned
    teacher head is replaced by a distinct teacher head drawn (``random.Random(seed)``) from
    ``teacher_heads`` outside ``exclude`` (the whole teacher circuit, in a table) and outside the
    aligned ones; every pair keeps its student head and positions. So the control has as many
    pairs, one to one where the aligned map is, and as many student heads crowding one teacher
    head where it crowds; only which teacher head each is read from changes."""
    aligned = tuple(dict.fromkeys(p.teacher for p in head_map.pairs))
    excluded = set(exclude) | set(aligned)
    pool = tuple(h for h in teacher_heads if h not in excluded)
    if len(pool) < len(aligned):
        raise InputError(f"the random control needs {len(aligned)} teacher heads outside the "
                         f"{len(excluded)} excluded; the teacher has only {len(pool)} more")
    drawn = dict(zip(aligned, random.Random(seed).sample(pool, len(aligned)), strict=True))
    pairs = tuple(replace(p, teacher=drawn[p.teacher]) for p in head_map.pairs)
    students = tuple(dict.fromkeys(p.student for p in pairs))
    teachers = tuple(drawn.values())
    return HeadMap(pairs, students, teachers, torch.zeros(len(students), len(teachers)),
                   "distance", "random", head_map.student_model, head_map.teacher_model)


# --------------------------------------------------------------------------------------------------
# Positions
# --------------------------------------------------------------------------------------------------


def position_columns(data) -> list[str]:
    """The task's single-position columns: ``pos_*`` holding one non-negative index for *every* item
    (theory of mind's ``pos_visibility`` is None in stories without a visibility sentence, so it is
    not one)."""
    return [c for c in data.column_names if c.startswith("pos_")
            and all(isinstance(v, int) and v >= 0 for v in data[c])]


def circuit_positions(circuit: Circuit) -> dict[Head, str]:
    """Each head of ``circuit`` -> the position of the first group (in the circuit's order) that
    holds it."""
    out: dict[Head, str] = {}
    for name, heads in circuit.groups.items():
        for h in heads:
            out.setdefault(h, circuit.positions[name])
    return out


@torch.no_grad()
def work_positions(
    model: HookedTransformer,
    data,
    heads: Iterable[Head],
    means: Float[Tensor, "layer ref_pos head_index d_head"],
    *,
    columns: Sequence[str] | None = None,
    batch_size: int = 64,
    progress: bool = False,
    resume: str | Path | None = None,
) -> tuple[dict[Head, str], dict[Head, dict[str, float]]]:
    """Where each head does its work: the position column where mean-ablating the head *only there*
    lowers the answer's probability most (ties: the first column).

    Args:
        model: a HookedTransformer.
        data: task items (with the position columns).
        heads: the heads to place.
        means: ``discovery.ablation.head_means`` of the model.
        columns: candidate columns (default: ``position_columns(data)``).
        progress: a bar over forward passes.
        resume: a file for the running sums after each batch (``ablation.position_drops``): at
            SmolLM2 depth placing 37 heads on 500 items took 49 minutes on a core.

    Returns:
        ``{head: column}`` and, per head, ``{column: mean probability drop}``.
    """
    heads = list(dict.fromkeys(heads))
    columns = list(columns or position_columns(data))
    measured = position_drops(model, data, heads, means, columns, batch_size=batch_size,
                              progress=progress, resume=resume)
    drops = {h: {c: float(measured[j, i]) for j, c in enumerate(columns)}
             for i, h in enumerate(heads)}
    chosen = {h: max(columns, key=lambda c, h=h: (drops[h][c], -columns.index(c))) for h in heads}
    return chosen, drops
