"""Stage 5, the table: every arm (``cdist.arms``) for every regime and seed. Per run: the test
accuracy of the full model and of the student's circuit (its means recomputed for the trained
model), random circuits, the OOD sets, the validation curve, and per-item correctness. The
untrained rows (base student, teacher) are evaluated as they are; an OOD set where the teacher
is below ``min_teacher_ood`` is flagged, not read.
"""

from __future__ import annotations

from dataclasses import dataclass

from cdist import arms
from cdist.errors import InputError
from cdist.pipeline.circuits import Circuits
from cdist.pipeline.context import Context
from cdist.pipeline.runs import evaluation_run, run_dir, train_run, unbits
from cdist.pipeline.selection import Selection

__all__ = ["Table", "make_table"]


@dataclass(frozen=True)
class Table:
    """Every run's record (arm, regime, seed, accuracies, per-item bits, curves) and the
    teacher's accuracy on each OOD set."""

    runs: tuple[dict, ...]
    teacher_ood: dict[str, float]


def _teacher_ood(ctx: Context, circuits: Circuits) -> dict[str, float]:
    # the teacher's row of the first seed: evaluated once, for both
    ood = evaluation_run(ctx, circuits, "teacher", ctx.cfg.seeds[0])["ood"]
    accuracy = {name: unbits(b).float().mean().item() for name, b in ood.items()}
    for name, acc in accuracy.items():
        flag = ("" if acc >= ctx.cfg.min_teacher_ood
                else f" (below {ctx.cfg.min_teacher_ood}: flagged, not read)")
        ctx.log(f"OOD {name}: teacher {acc:.3f}{flag}")
    return accuracy


def _row(ctx: Context, circuits: Circuits, selection: Selection, arm: arms.Arm, n_train: int,
         seed: int) -> dict:
    if not arm.trained:
        return evaluation_run(ctx, circuits, arm.model, seed)
    lam = selection.lam_strong if arm.strong else selection.lam
    head_map = selection.homolog_map if arm.head_map == "homolog" else selection.head_map
    return train_run(ctx, circuits, arm, n_train=n_train, seed=seed, lr=selection.lr, lam=lam,
                     head_map=head_map, folder=run_dir(ctx, arm, n_train, seed))


def make_table(ctx: Context, circuits: Circuits, selection: Selection) -> Table:
    """Stage 5 (module doc).

    Raises:
        InputError: an arm needs the homolog map and the student's layer origin is unknown.
    """
    homolog_arms = [a for a in ctx.cfg.arms if arms.arm(a).head_map == "homolog"]
    if homolog_arms and selection.homolog_map is None:
        raise InputError(f"{homolog_arms[0]!r} needs the teacher layer each student layer was "
                         "cut from: cut the student with models.keep_layers (its checkpoint "
                         "records it), give --student-layer-origin, or leave the arm out")
    teacher_ood = _teacher_ood(ctx, circuits)
    runs = []
    for n_train in ctx.cfg.regimes:
        for seed in ctx.cfg.seeds:
            for arm in map(arms.arm, ctx.cfg.arms):
                rec = _row(ctx, circuits, selection, arm, n_train, seed)
                runs.append({"arm": arm.name, "train_items": n_train, "seed": seed, **rec})
                ctx.log(f"n={n_train} seed {seed} {arm.name}: full {rec['full_accuracy']:.3f} "
                        f"circuit {rec['circuit_accuracy']:.3f}")
    return Table(tuple(runs), teacher_ood)
