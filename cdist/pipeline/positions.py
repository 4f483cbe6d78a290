"""Stage 2, where each teacher head works: the position at which its pairs are read for CKA.

A path-patching circuit gives each head its group's position (Prakash et al.: the value fetchers
at the last token, the position detectors at the query's box label, ...). A ranked circuit has no
groups, so each head is read where its mean ablation matters most (``matching.work_positions``).
A head the user names (``teacher_positions``) is read where the user says; it must be a head of
the teacher's circuit (a head no pair reads would make the setting silently do nothing). Reading
every pair at the last token instead would align heads that do their work elsewhere with nearly
constant activations there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from cdist import matching
from cdist.errors import InputError
from cdist.models import check_heads
from cdist.pipeline.circuits import Circuits
from cdist.pipeline.context import Context
from cdist.types import Head

__all__ = ["Placement", "place_teacher_heads"]


@dataclass(frozen=True)
class Placement:
    """Each teacher circuit head's position column, and how they were found."""

    positions: dict[Head, str]
    how: Literal["circuit groups", "largest ablation effect"]

    def to_dict(self) -> dict[str, str]:
        return {str(h): c for h, c in sorted(self.positions.items())}


def place_teacher_heads(ctx: Context, circuits: Circuits) -> Placement:
    """Stage 2 (module doc)."""
    circuit = circuits.of("teacher")
    if circuit.method == "path_patching":
        positions, how = matching.circuit_positions(circuit), "circuit groups"
    else:
        positions, _ = matching.work_positions(
            ctx.model("teacher"), ctx.items.found_on, circuit.heads, ctx.means("teacher"),
            progress=ctx.progress, resume=ctx.store.path("scans/teacher-positions.partial.pt"))
        how = "largest ablation effect"
    named = {Head.parse(h): col for h, col in ctx.cfg.teacher_positions.items()}
    check_heads(ctx.model("teacher"), named, "teacher_positions heads")
    strays = sorted(set(named) - set(circuit.heads))
    if strays:  # no pair reads them: the position would be silently unused
        raise InputError(f"--teacher-positions names {', '.join(map(str, strays))}, which "
                         f"{'is' if len(strays) == 1 else 'are'} not in the teacher's circuit "
                         f"({', '.join(map(str, circuit.heads))}); name heads of the circuit")
    placement = Placement(positions | named, how)
    user = ", user-named " + str(sorted(map(str, named))) if named else ""
    ctx.log(f"teacher head positions ({how}{user}): "
            + ", ".join(f"{h}@{c}" for h, c in placement.to_dict().items()))
    return placement
