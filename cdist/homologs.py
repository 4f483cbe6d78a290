"""Homologs: the heads a student shares with its teacher by descent.

A student cut from its teacher's own base model (``models.keep_layers``: the SmolLM2 student is
SmolLM2 without layers 12-19) inherits each kept layer's weights, so every student head has a known
counterpart in the teacher: the head of the same index in the layer it was cut from
(``model.layer_origin``, recorded in the checkpoint's ``config.json``). Fine-tuning moves both
models apart, but the pairing is a ground truth no matcher sees: ``homolog_map`` pairs each student
circuit head with its homolog, and ``recovery`` measures how many of a matcher's pairs are
homologs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from cdist.errors import InputError
from cdist.matching import HeadMap
from cdist.types import Head, HeadPair

__all__ = ["check_origin", "homolog", "homolog_map", "recovery"]


def check_origin(layer_origin: Sequence[int], student_layers: int, teacher_layers: int) -> None:
    """Refuse a layer mapping that does not fit the two models (one origin per student layer,
    each a teacher layer, none twice)."""
    origin = list(layer_origin)
    if (len(origin) != student_layers or len(set(origin)) != len(origin)
            or not all(0 <= i < teacher_layers for i in origin)):
        raise InputError(f"layer origin {origin} does not map the student's {student_layers} "
                         f"layers to distinct layers of the teacher's {teacher_layers}; is this "
                         "student cut from this teacher?")


def homolog(head: Head, layer_origin: Sequence[int]) -> Head:
    """The teacher head a student head descends from."""
    return Head(layer_origin[head.layer], head.head)


def homolog_map(student_heads: Sequence[Head], layer_origin: Sequence[int],
                positions: Mapping[Head, str], *, student_model: str = "",
                teacher_model: str = "") -> HeadMap:
    """Each student head paired with its homolog (one to one), read at the homolog's position in
    ``positions`` (teacher head -> position column) on both sides.

    The matrix is the identity over the pairs (1 for a homolog, a similarity), so the map reads
    like any matcher's.
    """
    students = tuple(dict.fromkeys(student_heads))
    if not students:
        raise InputError("a homolog map needs student heads (is the student circuit empty?)")
    teachers = tuple(homolog(h, layer_origin) for h in students)
    missing = sorted(str(t) for t in teachers if t not in positions)
    if missing:
        raise InputError(f"no position for the homolog teacher heads {missing}")
    pairs = tuple(HeadPair(s, t, positions[t], positions[t])
                  for s, t in zip(students, teachers, strict=True))
    return HeadMap(pairs, students, teachers, torch.eye(len(students)), "similarity", "homolog",
                   student_model, teacher_model)


def recovery(head_map: HeadMap, layer_origin: Sequence[int]) -> dict:
    """How much of ``head_map`` is homologs: ``homolog_pairs`` of ``pairs``, their share
    (``recovery``), and ``reachable``: the student heads whose homolog is among the map's teacher
    heads at all (a matcher that only sees the teacher's circuit cannot pair the others with
    their homolog)."""
    pairs = {(p.student, p.teacher) for p in head_map.pairs}
    hits = sum(t == homolog(s, layer_origin) for s, t in pairs)
    teachers = set(head_map.teacher_heads)
    students = {s for s, _ in pairs}
    return {"pairs": len(pairs), "homolog_pairs": hits,
            "recovery": hits / len(pairs) if pairs else float("nan"),
            "reachable": sum(homolog(s, layer_origin) in teachers for s in students),
            "student_heads": len(students)}
