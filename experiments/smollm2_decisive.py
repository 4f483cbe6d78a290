"""The decisive SmolLM2 tables: does CE + Align CKA beat circuit CE alone on a real model?

    python experiments/smollm2_models.py --out runs/smollm2            # the teacher and student
    python experiments/smollm2_decisive.py pilot --models runs/smollm2  # choices and power
    python experiments/smollm2_decisive.py table --models runs/smollm2  # the table itself

    python experiments/smollm2_models.py --task ioi                     # -> runs/smollm2-ioi
    python experiments/smollm2_decisive.py pilot --task ioi             # the same design on IOI
    python experiments/smollm2_decisive.py table --task ioi

    python experiments/smollm2_decisive.py pilot --smoke --models M   # every step at toy sizes
    python experiments/smollm2_decisive.py status                     # how far each step is

``--smoke`` runs both steps at the sizes of ``SMOKE`` (a few items and steps, two seeds, no
faithfulness threshold) into ``runs/<task>_smollm2_decisive-smoke``: a check of a setup's
mechanics in a minute on tiny models (``tests/test_decisive.py``), never a result.

Each task is a ``Study`` (``STUDIES``): its items, its headroom grid and target, the lambdas, and
its out-of-distribution candidates; every other step and rule is the same for both.

Both steps resume where they stopped (every finished run is kept by its identity) and refuse models
other than the ones the models folder's ``models.json`` recorded (their fingerprints).

**Pilot** (``OUT/pilot``, validation items only, seeds that are not the table's):
1. the circuits (the teacher's by path patching, grown until it is faithful; the student's by
   mean ablation), the teacher heads' positions, every one-to-one head map and the homolog map
   (the student is SmolLM2 without layers 12-19, so every student head has a homolog), each map's
   homolog recovery;
2. the teacher's accuracy on the study's OOD candidates (entity tracking: box counts outside
   both models' 2-7-box training mix, the largest where the teacher is at or above 0.9; IOI: the
   other templates, the first two where it is): the table's OOD sets;
3. headroom: circuit CE for every training-set size and lr of the study's grid, its ``steps``;
   the size and lr whose final validation accuracy is nearest the study's target within +-0.05
   (nearest the target if none is), and the steps: 1.5 times the step where that curve first
   comes within 0.01 of its best (its plateau), so that slower arms pass it too;
4. selection (``cdist.pipeline.select``, seed ``SELECT_SEED``): the matcher (one-to-one rules) and
   lambda of CE + Align CKA, lambdas spanning a CKA:CE gradient ratio of about 0.1 to 1;
5. power: circuit CE and the selected CE + Align CKA on ``Scale.pilot_seeds``, their per-seed
   validation differences and discordance give the run-to-run variance (``cdist.power``), the
   discordance of arms that truly differ by ``EFFECT`` (the pilot's two-way churn plus the items
   such a difference flips one way: ``power.alternative_discordance``), and so the seeds and test
   items the table needs for ``POWER`` power at a ``EFFECT`` difference.
``OUT/pilot/pilot.json`` records every number and choice.

**Table** (``OUT/table``, its report ``table.md``, ``.csv``, ``.json`` and figures from
``cdist.report``, and ``power.json``: the power it had for an ``EFFECT`` difference): the arms of
``ARMS`` on the chosen settings, as many seeds and test items as the pilot asks (at least
``Scale.min_seeds``), the pilot's OOD sets, 1,000 items each; the primary comparison (declared in
``cdist.arms`` and in the README before the table runs): CE + Align CKA vs circuit CE, test
accuracy, mean per-seed difference with its interval, p and the equivalence verdict at
+-``EFFECT``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

parser = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("step", choices=["pilot", "table", "status"],
                    help="status: what each step has finished and how long the rest may take "
                    "(reads the folders only)")
parser.add_argument("--task", choices=["entity_tracking", "ioi"], default="entity_tracking")
parser.add_argument("--models", default=None, help="the folder experiments/smollm2_models.py "
                    "wrote (default: runs/smollm2, or runs/smollm2-ioi for IOI)")
parser.add_argument("--out", default=None, help="default: results/<task>_smollm2_decisive")
parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
parser.add_argument("--smoke", action="store_true", help="every step at toy sizes (module doc)")
args = parser.parse_args()

import torch  # noqa: E402  (after argparse, so that --help answers at once)

from cdist import arms, models, pipeline, power, report, stats, tasks  # noqa: E402
from cdist.checkpoints import atomic_write_json  # noqa: E402
from cdist.discovery import DiscoveryConfig  # noqa: E402
from cdist.distill import DistillConfig  # noqa: E402
from cdist.errors import CdistError  # noqa: E402
from cdist.evaluate import accuracy  # noqa: E402
from cdist.pipeline.runs import unbits  # noqa: E402
from cdist.provenance import git_commit  # noqa: E402


@dataclass(frozen=True)
class Study:
    """What differs between the tasks; every other step and rule is shared (module doc)."""

    task_kwargs: dict
    grid_n: tuple[int, ...]  # training-set sizes of the headroom grid
    grid_lr: tuple[float, ...]
    grid_steps: int
    target: float  # circuit CE's validation accuracy the headroom choice aims at
    lambdas: tuple[float, ...]
    ood: tuple[tuple[str, dict], ...]  # candidates, in order of preference
    n_ood: int  # how many passing candidates the table takes
    ood_fixed: tuple[tuple[str, dict], ...] = ()  # taken whatever the teacher's accuracy


STUDIES = {
    "entity_tracking": Study(
        task_kwargs={"n_boxes": 3, "template": "prakash"}, grid_n=(16, 32, 64),
        grid_lr=(1e-4, 3e-4, 1e-3), grid_steps=240, target=0.75,
        lambdas=(0.03, 0.1, 0.3, 1.0),
        ood=tuple((f"{b} boxes", {"n_boxes": b}) for b in (10, 9, 8)), n_ood=1,
        ood_fixed=(("template compact", {"template": "compact"}),)),
    # the base student is at 0.73 on the validation items and the teacher at 0.955: the
    # target is halfway; lrs run lower than entity tracking's (at 32 items and 1e-4, circuit
    # CE passes the teacher in 40 steps)
    "ioi": Study(
        task_kwargs={}, grid_n=(16, 32, 64), grid_lr=(3e-6, 1e-5, 3e-5), grid_steps=120,
        target=0.84, lambdas=(0.1, 0.3, 1.0, 3.0),
        # most unlike the ``when`` template first; ``friends`` is left out, the teacher is at
        # 0.56 there (300 items)
        ood=tuple((f"template {t}", {"template": t}) for t in ("then", "while", "after")),
        n_ood=2)}


@dataclass(frozen=True)
class Scale:
    """How large each step is (items, steps, seeds) and how strict (the faithfulness threshold, the
    path-patching rule): ``FULL`` for the tables, ``SMOKE`` for ``--smoke``. ``pilot.json`` names
    its scale, and the table refuses a pilot of another."""

    name: str = "full"
    val_items: int = 500
    reference_items: int = 64
    discovery_items: int = 64
    batch_size: int = 16
    eval_every: int = 20
    pilot_test_items: int = 100
    pilot_seeds: tuple[int, ...] = (201, 202, 203, 204)
    ood_items: int = 1000
    ood_teacher_items: int = 300
    item_options: tuple[int, ...] = (1000, 2000, 3000)  # the test-set sizes the power plan weighs
    min_seeds: int = 5
    seed_cap: int | None = None  # at most this many table seeds whatever the plan (smoke only)
    min_faithfulness: float = 0.8
    min_effect: float | str = "noise"  # the teacher's path-patching rule (DiscoveryConfig)
    study: dict = field(default_factory=dict)  # overrides of the task's Study at this scale


FULL = Scale()
# tiny models need not do the task: no head would clear the noise rule, no circuit be faithful
SMOKE = Scale(name="smoke", val_items=24, reference_items=16, discovery_items=16, batch_size=8,
              eval_every=2, pilot_test_items=16, pilot_seeds=(201, 202), ood_items=16,
              ood_teacher_items=16, item_options=(24, 32), min_seeds=2, seed_cap=2,
              min_faithfulness=0.0, min_effect=0.0,
              study={"grid_n": (8, 16), "grid_lr": (1e-3,), "grid_steps": 4,
                     "lambdas": (0.03, 0.1)})
MATCHERS = ("ablation-1to1", "ablation-baseline-1to1", "cka-1to1")
SELECT_SEED = 100
OOD_MIN_TEACHER = 0.9
EFFECT, POWER, ALPHA = 0.02, 0.8, 0.05
ARMS = ("base student", "teacher", "fully distilled, CE", "circuit distilled, CE",
        "circuit distilled, KD", "circuit distilled, CE + Align CKA",
        "circuit distilled, CE + Align CKA (homolog)", "circuit distilled, CE + Shuffled CKA",
        "circuit distilled, CE + Rand CKA", "circuit distilled, CE + Align CKA (strong)",
        "circuit distilled, CE + Shuffled CKA (strong)", "positive control, Align CKA (small lr)",
        "positive control, Shuffled CKA (small lr)")
# what the table folder takes from the pilot's: kept by identity, so reused only if the same (the
# faithfulness records hold the grown circuits with their heads' positions, an hour to place at
# entity tracking's depth)
FROM_PILOT = ("cache", "scans", "search-teacher", "search-student", "select",
              "faithfulness-teacher.json", "faithfulness-student.json")

if args.threads:
    torch.set_num_threads(args.threads)
scale = SMOKE if args.smoke else FULL
study = replace(STUDIES[args.task], **scale.study)
source = Path(args.models or ("runs/smollm2" if args.task == "entity_tracking"
                              else "runs/smollm2-ioi"))
out = Path(args.out or (f"runs/{args.task}_smollm2_decisive-smoke" if args.smoke
                        else f"results/{args.task}_smollm2_decisive"))
if args.smoke and out.resolve().is_relative_to(Path(__file__).resolve().parents[1] / "results"):
    parser.error(f"--smoke --out {out}: a smoke run is a check, not a result; give a folder "
                 "outside results/ (default: runs/<task>_smollm2_decisive-smoke)")
if args.step != "status" and not (source / "models.json").is_file():  # status reads no model
    parser.error(f"no {source / 'models.json'}: make the models first (python "
                 f"experiments/smollm2_models.py --task {args.task} --out {source})")
built = {} if args.step == "status" else json.loads((source / "models.json").read_text())["models"]


def config(**design) -> pipeline.ExperimentConfig:
    """The experiment on the recorded models, with ``design`` (item counts, regimes, grids)."""
    steps = design.pop("steps", study.grid_steps)
    return pipeline.ExperimentConfig(
        task=args.task, task_kwargs=study.task_kwargs, data_seed=0, val_items=scale.val_items,
        reference_items=scale.reference_items, discovery_items=scale.discovery_items,
        n_random=1, select_seed=SELECT_SEED, min_faithfulness=scale.min_faithfulness,
        distill=DistillConfig(steps=steps, eval_every=scale.eval_every,
                              batch_size=scale.batch_size),
        # the teacher's search scans exactly only the 30 senders per group that path
        # attribution ranks first (30 layers: each exact scan is minutes)
        discovery=DiscoveryConfig(prefilter=30, min_effect=scale.min_effect),
        matchers=MATCHERS, margin=EFFECT, alpha=ALPHA,
        student_layer_origin=tuple(built["student"]["kept_layers"]),
        fingerprints={role: built[role]["fingerprint"] for role in ("teacher", "student")},
        **design)


def checkpoint(role: str) -> Path:
    """``role``'s checkpoint: ``cdist finetune``'s ``ROLE/model``, or ``ROLE`` itself, where
    ``smollm2_models.py`` saved it before it called ``cdist finetune``, or the file recorded
    (IOI's teacher is the GGUF as it comes)."""
    for made in (source / role / "model", source / role):
        if made.is_dir():
            return made
    return Path(built[role]["path"])


def context(cfg, folder: Path) -> pipeline.Context:
    loaders = {role: (lambda role=role: models.load_llama(checkpoint(role)))
               for role in ("teacher", "student")}
    ctx = pipeline.Context(cfg, folder, loaders,
                           {role: str(checkpoint(role)) for role in ("teacher", "student")})
    pipeline.check_items(cfg, ctx.model("student").tokenizer)
    return ctx


def plateau(curve: list) -> int:
    """The first step whose validation accuracy is within 0.01 of the curve's best."""
    best = max(acc for _, acc in curve)
    return next(step for step, acc in curve if acc >= best - 0.01)


def ood_sets(ctx) -> dict:
    """The teacher's accuracy on each OOD candidate (``ood_teacher_items``, seed 7000 plus
    the candidate's box count, or its place in the list), and the sets the table takes."""
    found = {}
    for i, (label, kwargs) in enumerate(study.ood):
        seed = 7000 + kwargs.get("n_boxes", i)
        items = tasks.get_task(args.task).items(
            scale.ood_teacher_items, tokenizer=ctx.model("student").tokenizer, seed=seed,
            split="test", **{**study.task_kwargs, **kwargs})
        found[label] = accuracy(ctx.model("teacher"), items)
        ctx.log(f"teacher on {label}: {found[label]:.3f}")
    fit = [(label, kw) for label, kw in study.ood if found[label] >= OOD_MIN_TEACHER]
    # none fits: the last candidate (entity tracking's fewest boxes), the teacher's accuracy said
    taken = fit[:study.n_ood] or [study.ood[-1]]
    return {"teacher": found, "teacher_ok": bool(fit),
            "sets": [list(s) for s in (*taken, *study.ood_fixed)]}


def headroom(ctx, circuits, maps) -> list[dict]:
    """Circuit CE for every size and lr of the grid, on the validation items (first pilot seed)."""
    val, ce, rows = ctx.on_validation(), arms.arm("circuit distilled, CE"), []
    for n in study.grid_n:
        for lr in study.grid_lr:
            rec = pipeline.train_run(val, circuits, ce, n_train=n, seed=scale.pilot_seeds[0],
                                     lr=lr, lam=0.0, head_map=maps.maps[MATCHERS[0]],
                                     folder=ctx.out / "grid" / f"ce-n{n}-lr{lr}")
            curve = [(m["step"], m["accuracy"]) for m in rec["metrics"]]
            rows.append({"train_items": n, "lr": lr, "val_accuracy": curve[-1][1],
                         "plateau_step": plateau(curve), "curve": curve})
            ctx.log(f"grid n={n} lr={lr}: validation {curve[-1][1]:.3f}, plateau at step "
                    f"{rows[-1]['plateau_step']}")
    return rows


def choose(rows: list[dict]) -> dict:
    """The size and lr nearest the target (within +-0.05 where one is), and the steps."""
    best = min(rows, key=lambda r: (abs(r["val_accuracy"] - study.target), r["train_items"]))
    every = scale.eval_every
    steps = min(study.grid_steps, every * math.ceil(1.5 * max(best["plateau_step"], every) / every))
    return {"train_items": best["train_items"], "lr": best["lr"], "steps": steps,
            "in_range": abs(best["val_accuracy"] - study.target) <= 0.05,
            "val_accuracy": best["val_accuracy"],
            "target": study.target}


def power_pilot(ctx, circuits, selection, chosen: dict) -> dict:
    """Circuit CE and the selected CE + Align CKA on the pilot seeds: the per-seed differences,
    the run-to-run variance and the seeds and items the table needs."""
    val, runs = ctx.on_validation(), {}
    for name in (arms.PRIMARY[0], arms.PRIMARY[1]):
        for seed in scale.pilot_seeds:
            runs[name, seed] = pipeline.train_run(
                val, circuits, arms.arm(name), n_train=chosen["train_items"], seed=seed,
                lr=chosen["lr"], lam=selection.lam, head_map=selection.head_map,
                folder=ctx.out / "power" / f"{pipeline.slug(name)}-seed{seed}")
    bits = {name: [unbits(runs[name, s]["test_full"]) for s in scale.pilot_seeds]
            for name in arms.PRIMARY}
    found = variance_of(bits)
    plans = power.plan(EFFECT, found["run_variance"]["run_var"], found["discordance_alternative"],
                       scale.item_options, power=POWER, alpha=ALPHA)
    return {"seeds": list(scale.pilot_seeds), "validation_items": len(bits[arms.PRIMARY[0]][0]),
            **found, "plans": plans}


def variance_of(bits: dict) -> dict:
    """The primary pair's comparison on per-seed correctness ``bits`` (arm -> one tensor a seed),
    the run-to-run variance it shows, and the discordance of arms ``EFFECT`` apart
    (``cdist.power``): the pilot's plan, and the table's achieved power, rest on these."""
    compared = stats.compare(bits[arms.PRIMARY[0]], bits[arms.PRIMARY[1]], margin=EFFECT,
                             alpha=ALPHA)
    variance = power.run_variance(compared["seed_level"]["diffs"], compared["discordance"],
                                  len(bits[arms.PRIMARY[0]][0]))
    pi = power.alternative_discordance(compared["discordance"], compared["seed_level"]["mean"],
                                       EFFECT)
    return {"comparison": compared, "run_variance": variance, "discordance_alternative": pi}


def achieved_power(pilot: dict, runs: list[dict]) -> dict:
    """The power the table had for an ``EFFECT`` difference, with the run-to-run variance and
    discordance its own primary pair shows (not the power at the difference it found, which says
    nothing the p-value does not), beside the pilot's plan. ``runs``: the table's records (arm,
    regime, seed, per-item bits)."""
    runs = sorted((r for r in runs if r["arm"] in arms.PRIMARY
                   and r["train_items"] == pilot["chosen"]["train_items"]),
                  key=lambda r: r["seed"])
    bits = {name: [unbits(r["test_full"]) for r in runs if r["arm"] == name]
            for name in arms.PRIMARY}
    found = variance_of(bits)
    n_items, n_seeds = len(bits[arms.PRIMARY[0]][0]), len(bits[arms.PRIMARY[0]])
    achieved = power.design_power(EFFECT, found["run_variance"]["run_var"],
                                  found["discordance_alternative"], n_items, n_seeds, ALPHA)
    return {"effect": EFFECT, "alpha": ALPHA, "test_items": n_items, "seeds": n_seeds,
            "achieved_power": achieved, "planned_power": pilot["design"]["planned_power"],
            "run_variance": found["run_variance"],
            "discordance_alternative": found["discordance_alternative"],
            "pilot_run_variance": pilot["power"]["run_variance"]["run_var"]}


def design(pilot: dict) -> dict:
    """The table's seeds and test items from the power plan: the fewest items whose plan needs at
    most 12 seeds, at least ``min_seeds`` seeds (at most ``seed_cap``, where one is set)."""
    plans = pilot["power"]["plans"]
    ok = [p for p in plans if p["n_seeds"] is not None and p["n_seeds"] <= 12]
    chosen = ok[0] if ok else plans[-1]
    seeds = max(scale.min_seeds, chosen["n_seeds"] or 12)
    seeds = min(seeds, scale.seed_cap or seeds)
    achieved = power.design_power(EFFECT, pilot["power"]["run_variance"]["run_var"],
                                  pilot["power"]["discordance_alternative"],
                                  chosen["n_items"], seeds, ALPHA)
    return {"seeds": list(range(seeds)), "test_items": chosen["n_items"],
            "planned_power": achieved}


def pilot_config(chosen: dict | None = None) -> pipeline.ExperimentConfig:
    """The pilot's experiment: the headroom grid, or once it has ``chosen``, selection's."""
    grid = ({"regimes": study.grid_n, "lrs": study.grid_lr} if chosen is None else
            {"regimes": (chosen["train_items"],), "lrs": (chosen["lr"],),
             "steps": chosen["steps"]})
    return config(test_items=scale.pilot_test_items, lambdas=study.lambdas,
                  seeds=scale.pilot_seeds, **grid)


def table_config(pilot: dict) -> pipeline.ExperimentConfig:
    """The table the pilot planned. Selection's grid is the pilot's, so that its runs are reused
    and it chooses again what the pilot chose: the matcher, lambda and the strong lambda, which is
    read from the whole grid's gradient ratios."""
    chosen, plan = pilot["chosen"], pilot["design"]
    return config(test_items=plan["test_items"], ood_items=scale.ood_items,
                  ood=tuple((label, kwargs) for label, kwargs in pilot["ood"]["sets"]),
                  seeds=tuple(plan["seeds"]), regimes=(chosen["train_items"],),
                  lrs=(chosen["lr"],), lambdas=study.lambdas, control_lr=chosen["lr"] / 10,
                  steps=chosen["steps"], arms=ARMS)


def run_pilot() -> None:
    folder, commit = out / "pilot", git_commit()
    ctx = context(pilot_config(), folder)
    with ctx.claim():
        circuits = pipeline.find_circuits(ctx)
        placement = pipeline.place_teacher_heads(ctx, circuits)
        maps = pipeline.make_head_maps(ctx, circuits, placement)
        ood = ood_sets(ctx)
        grid = headroom(ctx, circuits, maps)
        chosen = choose(grid)
        ctx.log(f"chosen: {chosen}")
        sel_ctx = context(pilot_config(chosen), folder)
        with sel_ctx.claim():
            selection = pipeline.select(sel_ctx, circuits, maps)
            powered = power_pilot(sel_ctx, circuits, selection, chosen)
    record = {"commit": commit, "task": args.task, "scale": scale.name, "grid": grid,
              "chosen": chosen, "ood": ood,
              "selection": selection.record, "power": powered,
              "homolog_recovery": {name: d.get("homolog_recovery")
                                   for name, d in maps.diagnostics.items()
                                   if not name.endswith("at pos_last")},
              "effect": EFFECT, "alpha": ALPHA, "target_power": POWER}
    record["design"] = design(record)
    atomic_write_json(record, folder / "pilot.json")
    print(json.dumps({k: record[k] for k in ("chosen", "design", "ood",
                                             "homolog_recovery")}, indent=1))


def run_table() -> None:
    commit, command = git_commit(), shlex.join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    planned = out / "pilot" / "pilot.json"
    if not planned.is_file():
        parser.error(f"no {planned}: run the pilot step first (with the same --task, --out and "
                     "--smoke), then the table")
    pilot = json.loads(planned.read_text())
    sel = pilot["selection"]["chosen"]
    made_at = pilot.get("scale", "full")  # pilots before the scales were full ones
    if made_at != scale.name:
        parser.error(f"{planned} is a {made_at} pilot and this a {scale.name} table: run both "
                     "steps with --smoke, or neither")
    ctx = context(table_config(pilot), out / "table")
    with ctx.claim():
        for name in FROM_PILOT:  # into the folder claimed, which cdist writes only once it made it
            kept, into = out / "pilot" / name, out / "table" / name
            if kept.is_dir() and not into.exists():
                shutil.copytree(kept, into)
            elif kept.is_file() and not into.exists():
                shutil.copy2(kept, into)
        started = time.time()
        circuits = pipeline.find_circuits(ctx, ("teacher", "student"))
        placement = pipeline.place_teacher_heads(ctx, circuits)
        maps = pipeline.make_head_maps(ctx, circuits, placement)
        selection = pipeline.select(ctx, circuits, maps)
        again = {"matcher": selection.matcher, "lambda": selection.lam,
                 "lambda_strong": selection.lam_strong, "lr": selection.lr}
        if any(again[k] != sel[k] for k in again):
            sys.exit(f"the table's selection chose {again}, the pilot's {sel}: the pilot's runs "
                     "were not reused as they are; stopped before any table run")
        table = pipeline.make_table(ctx, circuits, selection)
        summary = pipeline.write_summary(ctx, circuits, placement, maps, selection, table,
                                         time.time() - started)
        report.write_report(summary, out / "table", "table", commit=commit, command=command)
        powered = achieved_power(pilot, list(table.runs)) | {"commit": commit}
        atomic_write_json(powered, out / "table" / "power.json")
    print(f"power for a {EFFECT:g} difference: achieved {powered['achieved_power']:.2f} "
          f"(planned {powered['planned_power']:.2f}), {powered['seeds']} seeds x "
          f"{powered['test_items']} test items")
    primary = next(e for e in summary["comparisons"] if e["role"] == "primary")
    print(json.dumps({k: primary[k] for k in ("a", "b", "set", "seed_level", "clustered")},
                     indent=1, default=str))


def _finished(folder: Path) -> list[Path]:
    """The finished runs in ``folder`` (each keeps its record in ``<run>/eval.json``)."""
    return sorted(folder.glob("*/eval.json"))


def _pace(runs: list[Path]) -> float | None:
    """Seconds per run, training and evaluation: the median gap between consecutive runs'
    records (a restart's idle hours are one gap among many), None below three runs."""
    times = sorted(run.stat().st_mtime for run in runs)
    gaps = sorted(b - a for a, b in itertools.pairwise(times))
    return gaps[len(gaps) // 2] if len(gaps) >= 2 else None


def run_status() -> None:
    """How far the pilot and the table are, from their folders alone (no model loads)."""
    pilot_dir, table_dir = out / "pilot", out / "table"
    parts = {"headroom grid": (_finished(pilot_dir / "grid"),
                               len(study.grid_n) * len(study.grid_lr)),
             # circuit CE at the chosen lr, then every matcher at every lambda
             "selection": (_finished(pilot_dir / "select"), 1 + len(MATCHERS) * len(study.lambdas)),
             "power": (_finished(pilot_dir / "power"), 2 * len(scale.pilot_seeds))}
    planned = pilot_dir / "pilot.json"
    if planned.is_file():
        pilot = json.loads(planned.read_text())
        trained = [name for name in ARMS if arms.arm(name).trained]
        parts["table"] = (_finished(table_dir / "runs" / f"n{pilot['chosen']['train_items']}"),
                          len(trained) * len(pilot["design"]["seeds"]))
    for name, (runs, total) in parts.items():
        pace = _pace(runs)
        left = "" if pace is None or len(runs) >= total else (
            f", about {pace * (total - len(runs)) / 3600:.1f} h left at {pace / 60:.0f} min a run")
        print(f"{name}: {len(runs)}/{total} runs{left}")
    print(f"pilot: {'planned (' + str(planned) + ')' if planned.is_file() else 'not planned yet'}")
    done = table_dir / "results.json"
    print(f"table: {'done (' + str(done) + ')' if done.is_file() else 'not done yet'}")


if __name__ == "__main__":
    steps = {"pilot": run_pilot, "table": run_table, "status": run_status}
    try:
        steps[args.step]()
    except CdistError as err:  # bad input, refused models or folders: one line, as cdist's CLI
        parser.exit(2, f"{parser.prog}: error: {err}\n")
