"""The paper's experiment (Tables 1 and 2) for one teacher and one student: circuits, matching, distillation
runs, evaluation, statistics. ``experiments/entity_tracking.py`` and ``experiments/theory_of_mind.py`` are
thin command lines over ``run_experiment``.

Data, all fresh from the task generator: ``train`` (train split) is what distillation learns from;
``val`` (train split, other seed, minus any prompt in ``train``) chooses lambda and is where heads are
matched; ``reference`` (test split) gives the mean-ablation means; ``discovery`` (test split) is where the
circuits are found; ``test`` (test split) is where every reported accuracy comes from. The test items are
used for nothing else.

Circuits: the teacher's by its task's method (``cfg.discovery``: path patching for entity tracking, the
mean-ablation ranking for theory of mind); the student's by the mean-ablation ranking, the smallest top-n that
keeps ``target`` of its accuracy (``cfg.student_discovery``; the paper's other option for students).

Rows (each trained from the same base student, once per seed; the seed sets the data order and the random
head map):

- ``base student`` and ``teacher``: no training.
- ``fully distilled, CE``: every student weight, CE on the teacher's labels.
- ``circuit distilled, CE`` / ``Align CKA`` / ``CE + Rand CKA`` / ``CE + Align CKA`` / ``KD``: only the student
  circuit's heads (``cdist.distill``), with CE, CKA alone, CE plus CKA to randomly paired teacher heads, CE
  plus CKA to the matched teacher heads, or logit KD.

Every row reports the full model's accuracy, the student circuit's accuracy (every head outside the circuit
the student had before training mean-ablated, with means recomputed for the trained model), the random-circuit
accuracy and faithfulness (the accuracy logged during training is on the validation items). McNemar's exact
test compares CE + Align CKA with circuit CE and with fully distilled CE on the test items, per seed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from datasets import Dataset

from cdist import ablation, discovery, distill, matching, stats, tasks
from cdist.activations import head_z_dataset
from cdist.checkpoints import atomic_write_json
from cdist.discovery import DiscoveryConfig

__all__ = ["ROWS", "ExperimentConfig", "main", "run_experiment"]

ROWS = (
    "base student",
    "teacher",
    "fully distilled, CE",
    "circuit distilled, CE",
    "circuit distilled, Align CKA",
    "circuit distilled, CE + Rand CKA",
    "circuit distilled, CE + Align CKA",
    "circuit distilled, KD",
)


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything that defines one table (written next to its results)."""

    task: str  # "entity_tracking" | "theory_of_mind"
    task_kwargs: dict = field(default_factory=dict)  # template, n_boxes, ... for the generator
    seeds: tuple[int, ...] = (0, 1, 2)
    data_seed: int = 0
    train_items: int = 2000
    val_items: int = 500
    test_items: int = 1000
    reference_items: int = 500
    discovery_items: int = 200
    lambdas: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0)
    distill: distill.DistillConfig = distill.DistillConfig()
    discovery: discovery.DiscoveryConfig = discovery.DiscoveryConfig()  # the teacher's circuit
    # The student's: its top heads by mean-ablation impact, the smallest set that keeps `target` of its
    # accuracy (SPEC 1.2's alternative; path patching's top-k per group need not be faithful in a warm model).
    student_discovery: DiscoveryConfig = DiscoveryConfig(method="mean_ablation")
    matcher: str = "ablation"  # "ablation" (the paper's) or "cka"
    one_to_one: bool = False
    n_random: int = 5
    rows: tuple[str, ...] = ROWS


def _data(cfg: ExperimentConfig, tokenizer, n: int, split: str, seed: int) -> Dataset:
    make = tasks.entity_tracking if cfg.task == "entity_tracking" else tasks.theory_of_mind
    return make(n, tokenizer=tokenizer, seed=seed, split=split, **cfg.task_kwargs)


def _method(row: str, cfg: ExperimentConfig, lam: float) -> tuple[distill.DistillConfig, str] | None:
    """The DistillConfig and head map kind ("align", "random", None) of a trained row."""
    base = cfg.distill
    return {
        "fully distilled, CE": (replace(base, trainable="all", cka_weight=0.0, kd_weight=0.0), None),
        "circuit distilled, CE": (replace(base, cka_weight=0.0, kd_weight=0.0), None),
        "circuit distilled, Align CKA": (replace(base, ce_weight=0.0, cka_weight=lam, kd_weight=0.0), "align"),
        "circuit distilled, CE + Rand CKA": (replace(base, cka_weight=lam, kd_weight=0.0), "random"),
        "circuit distilled, CE + Align CKA": (replace(base, cka_weight=lam, kd_weight=0.0), "align"),
        "circuit distilled, KD": (replace(base, ce_weight=0.0, cka_weight=0.0, kd_weight=1.0), None),
    }.get(row)


def _summary(result: dict) -> dict:
    keys = ("full_accuracy", "circuit_accuracy", "random_accuracy", "faithfulness", "random_faithfulness")
    return {k: result[k] for k in keys}


def run_experiment(
    cfg: ExperimentConfig,
    load_teacher: Callable[[], object],
    load_student: Callable[[], object],
    out_dir: str | Path,
    *,
    names: tuple[str, str] = ("teacher", "student"),
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Run the whole experiment and write ``out_dir/results.json`` (rows x seeds, tests, circuits, head map).

    Args:
        cfg: the experiment.
        load_teacher, load_student: return a fresh HookedTransformer (the student is reloaded for every run).
        out_dir: where runs, circuits, head map and results go; finished distillation runs are reused.
        names: (teacher, student) names for the record.
        progress: tqdm bars in the distillation runs.
        log: where progress lines go.
    """
    out = Path(out_dir)
    t_start = time.time()
    teacher, student = load_teacher(), load_student()
    tok = student.tokenizer
    train = _data(cfg, tok, cfg.train_items, "train", cfg.data_seed * 10 + 1)
    if cfg.distill.cka_position not in train.column_names:
        positions = [c for c in train.column_names if c.startswith("pos_") and isinstance(train[0][c], int)]
        raise ValueError(f"cka_position {cfg.distill.cka_position!r} is not a position of this task's items; "
                         f"choose one of {positions}")
    seen = set(train["prompt"])
    val = _data(cfg, tok, cfg.val_items, "train", cfg.data_seed * 10 + 2)
    val = val.select([i for i, p in enumerate(val["prompt"]) if p not in seen])
    reference = _data(cfg, tok, cfg.reference_items, "test", cfg.data_seed * 10 + 3)
    found_on = _data(cfg, tok, cfg.discovery_items, "test", cfg.data_seed * 10 + 4)
    test = _data(cfg, tok, cfg.test_items, "test", cfg.data_seed * 10 + 5)

    # ---- circuits and head map
    circuits, means = {}, {}
    for role, model in (("teacher", teacher), ("student", student)):
        means[role] = ablation.head_means(model, reference)
        rule = cfg.student_discovery if role == "student" else cfg.discovery
        circuits[role], _, _ = discovery.find_circuit(model, cfg.task, found_on, means[role], rule,
                                                      model_name=names[role == "student"])
        circuits[role].to_json(_mkdir(out) / f"circuit-{role}.json")
        if not circuits[role].heads:
            raise ValueError(f"the {role}'s circuit is empty: no head passed the discovery rule {rule}; "
                             "lower --min-effect (or check that the model does the task)")
        log(f"{role} circuit: {len(circuits[role].heads)} heads {[str(h) for h in circuits[role].heads]}")
    s_heads, t_heads = circuits["student"].heads, circuits["teacher"].heads
    if cfg.matcher == "ablation":
        s_scan = ablation.head_ablation_scan(student, val, means=means["student"])
        t_scan = ablation.head_ablation_scan(teacher, val, means=means["teacher"])
        s_base = float(s_scan["prob_ablated"][0, 0] + s_scan["prob_drop"][0, 0])  # drop = base - ablated
        head_map = matching.ablation_matcher(
            s_base, {h: float(s_scan["prob_ablated"][h.layer, h.head]) for h in s_heads},
            {h: float(t_scan["prob_ablated"][h.layer, h.head]) for h in t_heads},
            one_to_one=cfg.one_to_one, student_model=names[1], teacher_model=names[0])
    elif cfg.matcher == "cka":
        head_map = matching.cka_matcher(head_z_dataset(student, val, s_heads), head_z_dataset(teacher, val, t_heads),
                                        one_to_one=cfg.one_to_one, student_model=names[1], teacher_model=names[0])
    else:
        raise ValueError(f"matcher={cfg.matcher!r}; choose 'ablation' or 'cka'")
    head_map.to_json(out / "head_map.json")
    log(f"head map ({head_map.method}): " + ", ".join(f"{s}->{t}" for s, t in head_map.pairs))

    def run(row: str, seed: int, lam: float, run_dir: Path, eval_items) -> tuple[object, dict]:
        dcfg, kind = _method(row, cfg, lam)
        dcfg = replace(dcfg, seed=seed)
        hmap = head_map if kind == "align" else (
            matching.random_matcher(s_heads, t_heads, seed=seed) if kind == "random" else None)
        model = load_student()
        history = distill.distill(model, teacher, hmap, train, eval_items, dcfg, run_dir, heads=s_heads,
                                  progress=progress)
        return model, history

    # ---- lambda, chosen on the validation items (seed of the first run)
    sweep = []
    for lam in cfg.lambdas:
        model, history = run("circuit distilled, CE + Align CKA", cfg.seeds[0], lam, out / "sweep" / f"lambda-{lam}",
                             val)
        sweep.append({"lambda": lam, "val_accuracy": history["metrics"][-1]["accuracy"]})
        log(f"lambda {lam}: validation accuracy {sweep[-1]['val_accuracy']:.3f}")
    lam = max(sweep, key=lambda r: (r["val_accuracy"], -r["lambda"]))["lambda"] if sweep else cfg.distill.cka_weight

    # ---- the table
    results: dict[str, list[dict]] = {row: [] for row in cfg.rows}
    correct: dict[str, dict[int, torch.Tensor]] = {row: {} for row in cfg.rows}
    curves: dict[str, dict[int, list]] = {}
    for seed in cfg.seeds:
        for row in cfg.rows:
            if row in ("teacher", "base student"):  # untrained: the means found above still hold
                role = "teacher" if row == "teacher" else "student"
                model, history, row_means = (teacher if role == "teacher" else student), None, means[role]
            else:
                role = "student"
                model, history = run(row, seed, lam, out / "runs" / f"{_slug(row)}-seed{seed}", val)
                row_means = ablation.head_means(model, reference)  # a trained model has means of its own
            result = ablation.evaluate_circuit(model, circuits[role], test, means=row_means, n_random=cfg.n_random,
                                               seed=seed)
            results[row].append({"seed": seed, **_summary(result)})
            correct[row][seed] = result["full_correct"]
            if history is not None:
                curves.setdefault(row, {})[seed] = [(m["step"], m.get("ce")) for m in history["metrics"]]
            log(f"seed {seed} {row}: full {result['full_accuracy']:.3f} circuit {result['circuit_accuracy']:.3f} "
                f"random {result['random_accuracy']:.3f}")
    tests_ = {}
    ours = "circuit distilled, CE + Align CKA"
    for other in ("circuit distilled, CE", "fully distilled, CE"):
        if ours in correct and other in correct:
            tests_[f"{ours} vs {other}"] = [{"seed": s, **stats.mcnemar(correct[ours][s], correct[other][s])}
                                            for s in cfg.seeds]
    share = distill.trainable_share(student, cfg.distill, s_heads)
    summary = {
        "config": _jsonable(asdict(cfg)),
        "teacher": names[0],
        "student": names[1],
        "circuits": {role: c.to_dict() for role, c in circuits.items()},
        "head_map": head_map.to_dict(),
        "lambda_sweep": sweep,
        "lambda": lam,
        "trainable": share,
        "rows": {row: {"runs": runs, **_mean_std(runs)} for row, runs in results.items()},
        "mcnemar": tests_,
        "ce_curves": {row: {str(s): c for s, c in v.items()} for row, v in curves.items()},
        "wall_time_s": round(time.time() - t_start, 1),
    }
    atomic_write_json(summary, out / "results.json")
    return summary


def _mean_std(runs: list[dict]) -> dict:
    out = {}
    for key in ("full_accuracy", "circuit_accuracy", "random_accuracy", "faithfulness"):
        values = [r[key] for r in runs if not math.isnan(r[key])]
        mean = sum(values) / len(values) if values else math.nan
        std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
        out[key] = {"mean": mean, "std": std}
    return out


def _slug(row: str) -> str:
    return row.replace(", ", "-").replace(" + ", "+").replace(" ", "_")


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _jsonable(d):
    if isinstance(d, dict):
        return {k: _jsonable(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_jsonable(v) for v in d]
    return d


def main(task: str, argv: list[str] | None = None) -> dict:
    """Command line of experiments/entity_tracking.py and experiments/theory_of_mind.py."""
    import argparse
    import sys

    from cdist import models, report, zoo
    from cdist.provenance import git_commit

    default = {"entity_tracking": ("et-teacher", "et-student"), "theory_of_mind": ("tom-teacher", "tom-student")}[task]
    parser = argparse.ArgumentParser(description=f"Tables 1-2 of circuit distillation for {task}: a teacher and a "
                                     "student from the zoo, or local Llama-3 checkpoint directories.")
    parser.add_argument("--teacher", default=default[0], help="zoo name or checkpoint directory")
    parser.add_argument("--student", default=default[1], help="zoo name or checkpoint directory")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per distillation run")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate (the paper: 2e-5 for Llama-3)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lambdas", type=float, nargs="*", default=[0.1, 0.3, 1.0, 3.0], help="CKA weights swept")
    parser.add_argument("--train-items", type=int, default=2000)
    parser.add_argument("--val-items", type=int, default=500)
    parser.add_argument("--test-items", type=int, default=1000)
    parser.add_argument("--k", type=int, default=2, help="entity tracking: heads per path-patching group")
    parser.add_argument("--min-effect", type=float, default=0.01, help="entity tracking: minimum -relative change")
    parser.add_argument("--student-method", default="mean_ablation", choices=["auto", "path_patching", "mean_ablation"],
                        help="how the student's circuit is found (auto: as the teacher's, by task)")
    parser.add_argument("--matcher", choices=["ablation", "cka"], default="ablation")
    parser.add_argument("--cka-position", default="pos_last",
                        help="position column the heads' z is aligned at (entity tracking: pos_last, pos_prev_label)")
    parser.add_argument("--one-to-one", action="store_true", help="assign each teacher head at most once")
    parser.add_argument("--kv-policy", choices=["group", "qo"], default="group")
    parser.add_argument("--rows", nargs="*", default=list(ROWS), help="which rows to run (default: all)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=f"results/{task}", help="runs, circuits and results.json")
    parser.add_argument("--figures", default="figures", help="where the table and figures go")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    unknown = sorted(set(args.rows) - set(ROWS))
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {list(ROWS)}")

    def loader(source: str):
        if source in zoo.names():
            return lambda: zoo.load(source, device=args.device)[0].eval()
        if Path(source).is_dir():
            dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
            return lambda: models.load_llama(source, device=args.device, dtype=dtype).eval()
        parser.error(f"{source!r} is neither a zoo model ({zoo.names()}) nor a checkpoint directory")

    if args.student in zoo.names():
        organism = zoo.manifest(args.student)["config"]
        task_kwargs = {"template": organism["template"], **organism.get("task_kwargs", {})}
        if task == "entity_tracking":
            task_kwargs["n_boxes"] = organism["n_boxes"]
    else:
        task_kwargs = {"template": "prakash" if task == "entity_tracking" else "causaltom"}
    cfg = ExperimentConfig(
        task=task, task_kwargs=task_kwargs, seeds=tuple(args.seeds), train_items=args.train_items,
        val_items=args.val_items, test_items=args.test_items, lambdas=tuple(args.lambdas),
        distill=distill.DistillConfig(steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                                      kv_policy=args.kv_policy, eval_every=max(1, args.steps // 10),
                                      cka_position=args.cka_position),
        discovery=discovery.DiscoveryConfig(k=args.k, min_effect=args.min_effect),
        student_discovery=discovery.DiscoveryConfig(method=args.student_method, k=args.k, min_effect=args.min_effect),
        matcher=args.matcher, one_to_one=args.one_to_one, rows=tuple(r for r in ROWS if r in args.rows),
    )
    commit = git_commit()
    try:
        summary = run_experiment(cfg, loader(args.teacher), loader(args.student), args.out,
                                 names=(args.teacher, args.student))
    except ValueError as e:  # a stale run folder, an empty circuit, ...: say what and how, not a traceback
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    command = "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    stem = "table1-entity-tracking" if task == "entity_tracking" else "table2-theory-of-mind"
    for path in report.write_report(summary, args.figures, stem, command=command, commit=commit):
        print(path)
    print(report.markdown_table(summary))
    return summary
