"""Stage 4, selection on validation items, with ``select_seed`` (never a table seed) at the smallest
regime, its runs scored on the validation items too (nothing chosen here reads the test items):
the lr of circuit CE; then the matcher and lambda of CE + Align CKA at that lr, each lambda's
CKA:CE gradient ratio at the start recorded; the sample-efficiency threshold (halfway from the
start of circuit CE's selected validation curve to its end); and the "strong" lambda, the smallest
whose gradient ratio reaches ``arms.STRONG_RATIO`` (the largest of the grid if none does). Ties go
to the smaller lr or lambda.
"""

from __future__ import annotations

from dataclasses import dataclass

from cdist import arms
from cdist.matching import HeadMap
from cdist.pipeline.circuits import Circuits
from cdist.pipeline.context import Context
from cdist.pipeline.head_maps import HeadMaps
from cdist.pipeline.runs import train_run
from cdist.records import write_record

__all__ = ["Selection", "select"]


@dataclass(frozen=True)
class Selection:
    """What selection chose, and its record (every run it compared)."""

    lr: float
    matcher: str
    lam: float
    lam_strong: float
    threshold: float
    head_map: HeadMap
    record: dict
    homolog_map: HeadMap | None = None  # where the student's layer origin is known


def _select_lr(ctx: Context, circuits: Circuits, head_map: HeadMap, n: int) -> list[dict]:
    rows, arm = [], arms.arm("circuit distilled, CE")
    for lr in ctx.cfg.lrs:
        rec = train_run(ctx, circuits, arm, n_train=n, seed=ctx.cfg.select_seed, lr=lr, lam=0.0,
                        head_map=head_map, folder=ctx.out / "select" / f"ce-lr{lr}")
        rows.append({"lr": lr, "val_accuracy": rec["metrics"][-1]["accuracy"],
                     "val_curve": [(m["step"], m["accuracy"]) for m in rec["metrics"]]})
        ctx.log(f"select lr {lr}: circuit CE validation accuracy {rows[-1]['val_accuracy']:.3f}")
    return rows


def _select_align(ctx: Context, circuits: Circuits, maps: HeadMaps, lr: float,
                  n: int) -> list[dict]:
    rows, arm = [], arms.arm("circuit distilled, CE + Align CKA")
    for name in ctx.cfg.matchers:
        for lam in ctx.cfg.lambdas:
            rec = train_run(ctx, circuits, arm, n_train=n, seed=ctx.cfg.select_seed, lr=lr,
                            lam=lam, head_map=maps.maps[name],
                            folder=ctx.out / "select" / f"{name}-lambda{lam}")
            start, end = rec["metrics"][0], rec["metrics"][-1]
            rows.append({"matcher": name, "lambda": lam, "val_accuracy": end["accuracy"],
                         "grad_ratio_start": start.get("grad_ratio"),
                         "cka_val_start": start.get("cka_val_mean"),
                         "cka_val_end": end.get("cka_val_mean")})
            ctx.log(f"select {name} lambda {lam}: validation accuracy {end['accuracy']:.3f}, "
                    "CKA:CE gradient ratio at the start "
                    f"{start.get('grad_ratio', float('nan')):.3g}")
    return rows


def select(ctx: Context, circuits: Circuits, maps: HeadMaps) -> Selection:
    """Stage 4 (module doc); the chosen map is written to ``head_map.json``."""
    cfg, small = ctx.cfg, min(ctx.cfg.regimes)
    ctx = ctx.on_validation()
    record: dict = {"seed": cfg.select_seed, "train_items": small}
    record["lr"] = _select_lr(ctx, circuits, maps.maps[cfg.matchers[0]], small)
    best_lr = max(record["lr"], key=lambda r: (r["val_accuracy"], -r["lr"]))
    lr = best_lr["lr"]
    record["align"] = _select_align(ctx, circuits, maps, lr, small)
    best = max(record["align"], key=lambda r: (r["val_accuracy"], -r["lambda"]))
    matcher, lam = best["matcher"], best["lambda"]
    pulling = [r["lambda"] for r in record["align"] if r["matcher"] == matcher
               and (r["grad_ratio_start"] or 0) >= arms.STRONG_RATIO]
    lam_strong = min(pulling) if pulling else max(cfg.lambdas)
    curve = best_lr["val_curve"]
    threshold = (curve[0][1] + curve[-1][1]) / 2
    record |= {"chosen": {"lr": lr, "matcher": matcher, "lambda": lam,
                          "lambda_strong": lam_strong, "threshold": threshold},
               "why": "highest validation accuracy (ties: the smaller lr or lambda)"}
    ctx.log(f"chosen: lr {lr}, matcher {matcher}, lambda {lam} (strong: {lam_strong}); "
            f"sample-efficiency threshold {threshold:.3f}")
    head_map = maps.maps[matcher]
    write_record(head_map, ctx.out / "head_map.json")
    return Selection(lr, matcher, lam, lam_strong, threshold, head_map, record,
                     maps.maps.get("homolog"))
