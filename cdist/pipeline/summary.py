"""Stage 6, the summary: per arm and regime the accuracies (mean and sd over seeds), OOD accuracy,
steps to the sample-efficiency threshold and the validation curves; the declared comparisons
(``cdist.pipeline.comparisons``: the primary, the Holm-corrected secondaries and the checks), each
recomputed from the runs' per-item strings; and the table's record, ``results.json`` and
``per_item.json``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, replace

from cdist import distill
from cdist.checkpoints import atomic_write_json
from cdist.pipeline.circuits import Circuits
from cdist.pipeline.comparisons import compare_arms
from cdist.pipeline.config import ExperimentConfig
from cdist.pipeline.context import Context
from cdist.pipeline.head_maps import HeadMaps
from cdist.pipeline.positions import Placement
from cdist.pipeline.runs import unbits
from cdist.pipeline.selection import Selection
from cdist.pipeline.table import Table
from cdist.store import jsonable

__all__ = ["summarise", "write_summary"]


def _mean_sd(values: list) -> dict:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return {"mean": None, "sd": None, "n": 0}
    mean = sum(values) / len(values)
    sd = ((sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
          if len(values) > 1 else 0.0)
    return {"mean": mean, "sd": sd, "n": len(values)}


def _curves(recs: list[dict], threshold: float) -> dict:
    """What the trained runs' validation curves say, averaged over seeds."""
    curves = [r.get("metrics") for r in recs if r.get("metrics")]
    if not curves:
        return {}

    def mean_curve(key: str) -> list:
        return [(m["step"], sum(c[i][key] for c in curves) / len(curves))
                for i, m in enumerate(curves[0])]

    return {
        "steps_to_threshold": [next((m["step"] for m in c if m["accuracy"] >= threshold), None)
                               for c in curves],
        "val_ce_curve": mean_curve("val_ce"),
        "val_accuracy_curve": mean_curve("accuracy"),
        "grad_ratio_start": _mean_sd([c[0].get("grad_ratio") for c in curves]),
        "cka_val": {"start": _mean_sd([c[0].get("cka_val_mean") for c in curves]),
                    "end": _mean_sd([c[-1].get("cka_val_mean") for c in curves])},
        "wall_time_s": sum(r.get("wall_time_s", 0) for r in recs),
    }


def _row(recs: list[dict], threshold: float) -> dict:
    row = {k: _mean_sd([r[k] for r in recs]) for k in ("full_accuracy", "circuit_accuracy",
                                                         "random_accuracy", "faithfulness")}
    row["ood"] = {name: _mean_sd([unbits(r["ood"][name]).float().mean().item() for r in recs])
                  for name in recs[0]["ood"]}
    return row | _curves(recs, threshold)


def summarise(runs: list[dict], cfg: ExperimentConfig, threshold: float) -> dict:
    """The rows and tests of the table (module doc), from the runs' records alone."""
    table: dict = {}
    for r in runs:
        table.setdefault(f"n{r['train_items']}", {}).setdefault(r["arm"], []).append(r)
    rows = {regime: {arm: _row(recs, threshold) for arm, recs in by_arm.items()}
            for regime, by_arm in table.items()}
    return {"rows": rows, "comparisons": compare_arms(runs, margin=cfg.margin, alpha=cfg.alpha),
            "margin": cfg.margin, "alpha": cfg.alpha, "threshold": threshold}


def write_summary(ctx: Context, circuits: Circuits, placement: Placement, maps: HeadMaps,
                  selection: Selection, table: Table, wall: float) -> dict:
    """The table's record, written to ``results.json``, and every run's per-item results to
    ``per_item.json``."""
    cfg, student, s_heads = ctx.cfg, ctx.model("student"), circuits.heads("student")
    summary = {
        "config": jsonable(asdict(cfg)), "teacher": ctx.names["teacher"],
        "student": ctx.names["student"],
        "circuits": {role: circuits.of(role).to_dict() for role in ("teacher", "student")},
        # each circuit's faithfulness check on the validation items (stage 1): before, after,
        # the heads it added
        "faithfulness": {role: getattr(circuits, role).record.get("faithfulness")
                         for role in ("teacher", "student")},
        "teacher_positions": placement.to_dict(), "positions_from": placement.how,
        "head_maps": {name: m.to_dict() for name, m in maps.maps.items()},
        "diagnostics": maps.diagnostics, "selection": selection.record,
        "head_map": selection.head_map.to_dict(), "lambda": selection.lam,
        "lambda_strong": selection.lam_strong, "lr": selection.lr,
        "teacher_ood": table.teacher_ood,
        "trainable": distill.trainable_share(student, replace(cfg.distill, trainable="heads"),
                                             s_heads),
        "trainable_group": distill.trainable_share(student, replace(cfg.distill,
                                                                    kv_policy="group"), s_heads),
        **summarise(list(table.runs), cfg, selection.threshold),
        "wall_time_s": round(wall, 1),
    }
    keep = ("arm", "train_items", "seed", "test_full", "test_circuit", "ood")
    eval_sets = {"test": len(ctx.items.test), **{k: len(v) for k, v in ctx.items.ood.items()}}
    atomic_write_json({"eval_sets": eval_sets,
                       "runs": [{k: r[k] for k in keep} for r in table.runs]},
                      ctx.out / "per_item.json")
    atomic_write_json(summary, ctx.out / "results.json")
    return summary
