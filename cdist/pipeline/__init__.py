"""The circuit-distillation experiment for one teacher and one student (Wadhwa et al.'s Tables 1
and 2), as stages. Each stage is a function of the run's ``Context`` and the records of the stages
before it, and returns a frozen record of its own; ``run_stages`` below reads in data-flow order:

1. ``find_circuits`` (``circuits.py``): the teacher's circuit by its task's method, the student's
   by its rule;
2. ``place_teacher_heads`` (``positions.py``): where each teacher head works, so its pairs are read
   there;
3. ``make_head_maps`` (``head_maps.py``): one map per matcher, each diagnosed;
4. ``select`` (``selection.py``): lr, matcher and lambda on validation items, with a seed that is
   not the table's;
5. ``make_table`` (``table.py``): every arm (``cdist.arms``) over regimes and seeds, evaluated on
   test and OOD items (``runs.py``: one training run, one evaluation);
6. ``write_summary`` (``summary.py``): rows, the declared comparisons, ``results.json`` and
   ``per_item.json``.

The item sets are ``items.py``'s; what every stage reuses by identity is kept in the run folder's
store (``cdist.store``), so calling ``run_experiment`` again continues where it stopped. The
``cdist`` command's steps (``discover``, ``match``, ``distill``, ``evaluate``, ``table``) call the
same stages on one run folder.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from cdist.models import HookedTransformer
from cdist.pipeline.circuits import Circuits, find_circuits
from cdist.pipeline.config import ROLES, ExperimentConfig, Role
from cdist.pipeline.context import Context, folder_identity
from cdist.pipeline.head_maps import HeadMaps, make_head_maps
from cdist.pipeline.items import ItemSets, check_items, make_items
from cdist.pipeline.positions import Placement, place_teacher_heads
from cdist.pipeline.runs import evaluate_model, run_dir, slug, train_run
from cdist.pipeline.selection import Selection, select
from cdist.pipeline.summary import summarise, write_summary
from cdist.pipeline.table import Table, make_table
from cdist.progress import say

__all__ = ["ROLES", "Circuits", "Context", "ExperimentConfig", "HeadMaps", "ItemSets",
           "Placement", "Role", "Selection", "Table", "check_items", "evaluate_model",
           "find_circuits", "folder_identity", "make_head_maps", "make_items", "make_table",
           "place_teacher_heads", "run_dir", "run_experiment", "run_stages", "select", "slug",
           "summarise", "train_run", "write_summary"]


def run_stages(ctx: Context) -> dict:
    """Every stage, in order, on a context whose run folder this process holds; the summary."""
    started = time.time()
    circuits = find_circuits(ctx, ("teacher", "student"))
    placement = place_teacher_heads(ctx, circuits)
    maps = make_head_maps(ctx, circuits, placement)
    selection = select(ctx, circuits, maps)
    table = make_table(ctx, circuits, selection)
    return write_summary(ctx, circuits, placement, maps, selection, table,
                         time.time() - started)


def run_experiment(
    cfg: ExperimentConfig,
    load_teacher: Callable[[], HookedTransformer],
    load_student: Callable[[], HookedTransformer],
    out_dir: str | Path,
    *,
    names: tuple[str, str] = ("teacher", "student"),
    progress: bool = True,
    log: Callable[[str], None] = say,
) -> dict:
    """Run the experiment (module doc); write ``results.json`` and ``per_item.json`` to
    ``out_dir``. Finished runs are reused when their identity is the same, and an interrupted
    run resumes from its checkpoint, so calling it again continues where it stopped."""
    ctx = Context(cfg, out_dir, {"teacher": load_teacher, "student": load_student},
                  dict(zip(ROLES, names, strict=True)), progress=progress, log=log)
    # the items' tokenizer comes with a model: it loads before the folder is claimed
    check_items(cfg, ctx.model("student").tokenizer)
    with ctx.claim():
        return run_stages(ctx)
