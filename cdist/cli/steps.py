"""The pipeline's subcommands: ``discover``, ``match``, ``distill``, ``evaluate`` and ``table``,
each the stages of ``cdist.pipeline`` it needs, on one run folder.

What each leaves in the run folder (beside ``config.yaml`` and ``commands.log``):
- ``discover``: ``circuit-<role>.json``, ``discovery-<role>.json`` (method, positions, the circuit's
  accuracy and faithfulness on the test items, chance there, warnings), ``faithfulness-<role>.json``
  (stage 1's check on the validation items, and the heads a grown circuit gained), the scans
  (``scans/``, ``search-<role>/``), and a heatmap of each scan with the circuit outlined
  (``figures/``). Unlike the later steps it does not stop at a circuit that fails the check: it
  says so, and says when the model is at or below chance on the test items (its circuit then means
  nothing) or the circuit is not faithful there.
- ``match``: ``head_maps/<matcher>.json``, ``diagnostics.json`` and each map's figure.
- every step: ``cache/`` (each model's finding and the head maps with the inputs they were made
  from, so a later step in the folder reuses them and redoes nothing).
- ``distill``: ``runs/n<items>/<arm>-seed<seed>/`` (checkpoint, ``metrics.json``/``.csv``,
  ``eval.json``).
- ``evaluate``: ``evaluation.json`` (each model's test and OOD accuracy, its circuit's and random
  circuits'; every trained run's from its ``eval.json``).
- ``table``: ``results.json``, ``per_item.json``, and the report under ``--figures``; with
  ``--draw-only``, only the report's figures again, from the folder's ``results.json``.

``export`` reads a trained run's folder and writes its student elsewhere, as a transformers
checkpoint (``cdist.distill.export``).
"""

from __future__ import annotations

import argparse
import shlex
from dataclasses import replace
from pathlib import Path

from cdist import arms, run_folder, tasks
from cdist.cli import common, flags, settings
from cdist.cli.parser import Formatter, Parser
from cdist.cli.settings import RunSettings

__all__ = ["add_parsers"]

_EXAMPLES = {
    "discover": "cdist discover --teacher et-teacher --student et-student --out runs/et\n"
                "cdist discover --teacher ckpt/smollm2 --task entity_tracking --n-boxes 3 "
                "--prefilter 30 --out runs/real",
    "match": "cdist match --out runs/et --matchers ablation cka",
    "distill": "cdist distill --out runs/et --arm 'circuit distilled, CE + Align CKA' --lr 1e-3 "
               "--lam 1.0 --seed 0 --steps 300",
    "evaluate": "cdist evaluate --out runs/et",
    "table": "cdist table --task entity_tracking --seeds 0 1 2 --out runs/et\n"
             "cdist table --teacher ckpt/teacher --student ckpt/student --device cuda --lrs 2e-5\n"
             "cdist table --out runs/et --draw-only   # its figures again, from results.json",
}


_STEPS = {
    "discover": ("find the teacher's and/or the student's circuit for the task",
                 ("items", "discovery")),
    "match": ("map each student circuit head to teacher heads (every matcher asked for)",
              ("items", "discovery", "matching")),
    "distill": ("one training run of the student (any arm, lr, lambda, seed)",
                ("items", "discovery", "matching", "training")),
    "evaluate": ("full, circuit and random-circuit accuracy of the teacher, the student and "
                 "every trained run", ("items", "discovery")),
    "table": ("the paper's Table 1 or 2: every arm over seeds and regimes, selection on "
              "validation items, the declared statistics",
              ("items", "discovery", "matching", "training", "design")),
}


def _run_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("this run")
    g.add_argument("--arm", default="circuit distilled, CE + Align CKA",
                   choices=[a.name for a in arms.ARMS if a.trained], metavar="ARM",
                   help="how the student trains (an arm of the table; default: %(default)s)")
    g.add_argument("--matcher", default="ablation", choices=arms.MATCHERS,
                   help="whose head map the pairs come from")
    g.add_argument("--lr", type=float, default=None,
                   help=f"learning rate (default: {flags.LRS['zoo'][1]} for zoo students, "
                        f"{flags.LRS['pretrained'][1]} for checkpoints)")
    g.add_argument("--lam", type=float, default=1.0, help="CKA weight lambda")
    g.add_argument("--seed", type=int, default=0,
                   help="the run's seed (data order, shuffles, random pairs)")
    g.add_argument("--train-items", type=int, default=128, help="training items")


def _configure(p: argparse.ArgumentParser, name: str) -> None:
    """Step ``name``'s flags and handler on ``p``."""
    flags.add_flags(p, _STEPS[name][1])
    if name in ("discover", "evaluate"):
        p.add_argument("--roles", nargs="+", choices=["teacher", "student"], default=None,
                       help="which models (default: those named by --teacher/--student, "
                            "else both)")
    if name == "distill":
        _run_flags(p)
    if name == "table":
        p.add_argument("--figures", default=None,
                       help="where the tables and figures go (default: OUT/figures)")
        p.add_argument("--draw-only", action="store_true",
                       help="only redraw the table's figures into --figures from OUT/results.json "
                            "(nothing is run, recomputed or rewritten in OUT)")
    p.set_defaults(run=_HANDLERS[name], parser=p)


def run_step(name: str, argv: list[str]):
    """Step ``name`` on ``argv`` (its flags, as after ``cdist NAME``): what ``cdist NAME ARGV``
    does, for a caller inside cdist (the demo)."""
    p = Parser(prog=f"cdist {name}")
    _configure(p, name)
    return p.parse_args(argv).run(argparse.Namespace(parser=p, argv=list(argv)))


def add_parsers(sub) -> None:
    for name, (text, _) in _STEPS.items():
        p = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".",
                           epilog="example:\n  " + _EXAMPLES[name].replace("\n", "\n  "),
                           formatter_class=Formatter)
        _configure(p, name)
    report = sub.add_parser("report", help="one self-contained HTML page for a run folder",
                            description="One HTML page (plotly inlined: it opens offline) with "
                                        "whatever the folder holds: the table, the circuits' "
                                        "heatmaps, the head maps, the training curves, the "
                                        "diagnostics, the settings and the commits.",
                            epilog=("example:\n"
                                    "  cdist report --out runs/et  # -> runs/et/report.html"),
                            formatter_class=Formatter)
    report.add_argument("run_dir", nargs="?", default=None,
                        help="a folder a cdist command wrote (its --out); or give it as --out")
    report.add_argument("--out", default=None, dest="out_dir", metavar="RUN_DIR",
                        help="the same folder, named as every other step names it")
    report.add_argument("--page", default=None, help="where the page goes "
                        "(default: RUN_DIR/report.html)")
    report.set_defaults(run=_report, parser=report)
    _add_export(sub)


def _add_export(sub) -> None:
    export = sub.add_parser(
        "export", help="a trained run's student as a transformers checkpoint",
        description="Write a finished distillation run (its state.pt: the trained heads' deltas, "
                    "or every weight) on the base student it was trained from, as a transformers "
                    "LlamaForCausalLM folder with its tokenizer (cdist.distill.export). The base "
                    "student is the one the run folder's config.yaml names, checked against the "
                    "fingerprint the run recorded.",
        epilog="example:\n  cdist export runs/et/runs/n128/circuit_distilled-CE+Align_CKA-seed0 "
               "--to students/et-ce-align\n  # then, anywhere: "
               "LlamaForCausalLM.from_pretrained('students/et-ce-align')",
        formatter_class=Formatter)
    export.add_argument("run_folder", metavar="RUN", help="a trained run's folder "
                        "(OUT/runs/n<items>/<arm>-seed<seed>, as cdist distill prints it)")
    export.add_argument("--to", required=True, metavar="DIR",
                        help="the checkpoint folder to write (new, empty, or a checkpoint "
                             "cdist wrote there before, which is replaced)")
    export.add_argument("--student", default=None, metavar="MODEL",
                        help="the base student (zoo name or checkpoint) when the run folder's "
                             "config.yaml does not name it")
    export.set_defaults(run=_export, parser=export)


def _roles(args: RunSettings) -> tuple[str, ...]:
    if args.roles and len(set(args.roles)) != len(args.roles):
        raise flags.UsageError(f"--roles {' '.join(args.roles)} repeats a role; give each once")
    return tuple(args.roles or args.named_roles or ("teacher", "student"))


def _prepared(top: argparse.Namespace, command: str):
    """The step's settings (``common.parse``) and run context, checked and the folder claimed
    before anything is written."""
    args = settings.parse(top.parser, top.argv, command)
    settings.announce(args)
    _roles(args)  # a repeated role is refused before anything is written
    if command == "table":  # before the hours of the table, not after
        run_folder.check_owned(run_folder.check_writable(_figures(args)))
    ctx = common.context(args)
    ctx.claim()  # held until the command ends
    if command == "table":  # marked once the run folder is, which may hold it
        run_folder.claim_figures(_figures(args))
    settings.keep_settings(top.parser, args)
    return args, ctx


def _figures(args: RunSettings) -> str:
    """Where a table's report goes."""
    return args.figures or str(Path(args.out) / "figures")


def _discovery_record(ctx, args: RunSettings, role: str, found, circuits) -> dict:
    """``discovery-<role>.json``: the circuit, how it was chosen, where the teacher's heads work,
    and its accuracy and faithfulness on the test items."""
    from cdist import pipeline

    circuit = found.circuit
    record = {"role": role, "model": args.model(role), "task": args.task,
              "heads": [str(h) for h in circuit.heads], "circuit": circuit.to_dict(),
              "selection": found.record}
    if role == "teacher":
        placement = pipeline.place_teacher_heads(ctx, circuits)
        record["positions"], record["positions_from"] = placement.to_dict(), placement.how
    result = pipeline.evaluate_model(ctx, circuits, ctx.model(role), role)
    record["test"] = {k: result[k] for k in ("full_accuracy", "circuit_accuracy",
                                             "random_accuracy", "faithfulness")}
    record["test"]["chance"] = tasks.get_task(args.task).chance_accuracy(ctx.items.test)
    record["warnings"] = _warnings(ctx.cfg.min_faithfulness, role, record["test"])
    return record


def _warnings(threshold: float, role: str, test: dict) -> list[str]:
    """What a user must know before reading a circuit's test numbers: its model at or below
    chance, or the circuit below the faithfulness threshold (0: not checked)."""
    if not test["full_accuracy"] > test["chance"]:
        return [f"the {role} is at or below chance ({test['chance']:.3f}) on the test items: it "
                "cannot do the task, so its circuit means nothing"]
    if test["faithfulness"] < threshold:
        return [f"the {role}'s circuit is not faithful: faithfulness {test['faithfulness']:.3f} "
                f"on the test items, below --min-faithfulness {threshold}"]
    return []


def _discover(top: argparse.Namespace) -> dict:
    from cdist import pipeline, plots
    from cdist.checkpoints import atomic_write_json

    args, ctx = _prepared(top, "discover")
    out, made = Path(args.out), {}
    for role in _roles(args):
        circuits = pipeline.find_circuits(ctx, (role,), refuse=False)
        found = getattr(circuits, role)
        record = _discovery_record(ctx, args, role, found, circuits)
        atomic_write_json(record, out / f"discovery-{role}.json")
        # a search's groups on one colour scale
        largest = plots.shared_scale(s for n, s in found.scans.items()
                                     if n.startswith("path_patching_"))
        for name, scan in found.scans.items():
            shared = largest if name.startswith("path_patching_") else None
            plots.save_figure(plots.scan_figure(scan, marked=found.circuit.heads, largest=shared),
                              out / "figures" / f"{role}-{name}")
        print(f"{role} ({record['model']}): {len(found.circuit)} heads "
              f"{' '.join(map(str, found.circuit.heads))}; test accuracy full "
              f"{record['test']['full_accuracy']:.3f}, circuit "
              f"{record['test']['circuit_accuracy']:.3f}, random "
              f"{record['test']['random_accuracy']:.3f}, faithfulness "
              f"{record['test']['faithfulness']:.3f}")
        for warning in record["warnings"]:
            print(f"  warning: {warning}")
        made[role] = record
    print(f"written to {out}")
    return made


def _matched(ctx, names=None):
    """Stages 1-3: the circuits (kept from ``discover``), positions and the head maps."""
    from cdist import pipeline

    circuits = pipeline.find_circuits(ctx)
    placement = pipeline.place_teacher_heads(ctx, circuits)
    return circuits, pipeline.make_head_maps(ctx, circuits, placement, names)


def _match(top: argparse.Namespace) -> dict:
    from cdist import plots

    args, ctx = _prepared(top, "match")
    _, maps = _matched(ctx)
    out = Path(args.out)
    for name, hmap in maps.maps.items():  # the stage has logged each map and its warnings
        plots.save_figure(plots.head_map_figure(hmap), out / "figures" / f"head-map-{name}")
        plots.save_figure(plots.head_map_links_figure(hmap),
                          out / "figures" / f"head-map-links-{name}")
    print(f"written to {out}/head_maps, figures in {out}/figures")
    return maps.maps


def _distill(top: argparse.Namespace) -> dict:
    from cdist import pipeline

    args = settings.parse(top.parser, top.argv, "distill")
    settings.announce(args)
    if args.train_items < 1 or args.lam < 0:
        raise flags.UsageError(f"--train-items {args.train_items} and --lam {args.lam}: give at "
                                "least 1 training item and a lambda >= 0")
    if args.train_items < args.batch_size:
        raise flags.UsageError(f"--train-items {args.train_items} cannot fill one batch of "
                                f"{args.batch_size}; give more items or a smaller --batch-size")
    # the run's items are the first of its seed's pool, as in a table
    args = replace(args, regimes=(args.train_items,))
    ctx = common.context(args)
    arm = arms.arm(args.arm)
    lr = args.lr if args.lr is not None else ctx.cfg.lrs[len(ctx.cfg.lrs) // 2]
    # the run's settings (DistillConfig checks them), before anything is found or written
    arm.config(ctx.cfg.distill, lam=args.lam, lr=lr, control_lr=ctx.cfg.control_lr,
               seed=args.seed)
    ctx.claim()  # held until the command ends
    settings.keep_settings(top.parser, args)
    matcher = "homolog" if arm.head_map == "homolog" else args.matcher
    circuits, maps = _matched(ctx, (matcher,))
    folder = pipeline.run_dir(ctx, arm, args.train_items, args.seed)
    record = pipeline.train_run(ctx, circuits, arm, n_train=args.train_items, seed=args.seed,
                                lr=lr, lam=args.lam, head_map=maps.maps[matcher],
                                folder=folder)
    print(f"{arm.name}, lr {lr}, lambda {args.lam}, seed {args.seed}: test accuracy full "
          f"{record['full_accuracy']:.3f}, circuit {record['circuit_accuracy']:.3f} "
          f"({record['wall_time_s']:.0f} s); {folder}")
    return record


def _evaluate(top: argparse.Namespace) -> dict:
    from cdist import pipeline
    from cdist.checkpoints import atomic_write_json, read_json
    from cdist.errors import FileFormatError
    from cdist.pipeline.runs import ood_accuracies

    args, ctx = _prepared(top, "evaluate")
    out = Path(args.out)
    result: dict = {"models": {}, "runs": {}}
    keys = ("full_accuracy", "circuit_accuracy", "random_accuracy", "faithfulness", "train_items",
            "config")
    for path in sorted(out.glob("runs/*/*/eval.json")):  # read first: a damaged one stops nothing
        fix = f"delete {path.parent} and distill that run again"
        rec = read_json(path, fix)
        lacks = sorted(set(keys) - set(rec if isinstance(rec, dict) else {}))
        if lacks:
            raise FileFormatError(f"{path} is not a run's evaluation (it lacks {lacks}); {fix}")
        result["runs"][str(path.parent.relative_to(out))] = {
            **{k: rec[k] for k in keys},
            "ood_accuracy": ood_accuracies(rec.get("ood") or {})}
    for role in _roles(args):
        circuits = pipeline.find_circuits(ctx, (role,), refuse=False)
        rec = pipeline.evaluate_model(ctx, circuits, ctx.model(role), role)
        rec["ood_accuracy"] = ood_accuracies(rec["ood"])
        result["models"][role] = {"model": args.model(role), **rec}
        print(_accuracy_line(f"{role} ({args.model(role)})", rec))
    for name, rec in result["runs"].items():
        print(_accuracy_line(name, rec))
    atomic_write_json(result, out / "evaluation.json")
    return result


def _accuracy_line(name: str, rec: dict) -> str:
    ood = "".join(f", OOD {k} {v:.3f}" for k, v in rec.get("ood_accuracy", {}).items())
    return (f"{name}: full {rec['full_accuracy']:.3f}, circuit {rec['circuit_accuracy']:.3f}, "
            f"random circuit {rec['random_accuracy']:.3f}, faithfulness "
            f"{rec['faithfulness']:.3f}{ood}")


def _report(top: argparse.Namespace) -> Path:
    from cdist.report_page import write_run_page

    if top.run_dir and top.out_dir and Path(top.run_dir) != Path(top.out_dir):
        raise flags.UsageError(f"two run folders, {top.run_dir} and --out {top.out_dir}; give one")
    run_dir = top.run_dir or top.out_dir
    if run_dir is None:
        raise flags.UsageError("give the run folder: cdist report --out RUN_DIR")
    if top.page is not None:
        run_folder.check_writable(top.page, file=True)
    path = write_run_page(run_dir, top.page)
    print(path)
    return path


def _base_student(run: Path) -> str:
    """The student ``run`` was trained from, as its run folder's ``config.yaml`` names it."""
    top = run.resolve().parents[2] if len(run.resolve().parents) > 2 else run.resolve()
    config = top / settings.RUN_CONFIG
    named = settings.read_settings(config).get("student") if config.is_file() else None
    if not named:
        raise flags.UsageError(f"{config} does not name the student {run} was trained from; "
                               "pass --student MODEL")
    return str(named)


def _export(top: argparse.Namespace) -> Path:
    from cdist.distill import export

    run = Path(top.run_folder)
    export.state_path(run)  # a folder that is not a run is refused before any model loads
    out = export.check_output(top.to)
    source = top.student or _base_student(run)
    if Path(source).exists() and Path(source).resolve() == out.resolve():
        raise flags.UsageError(f"--to {top.to} is the base student's own checkpoint; give a new "
                               "folder")
    path = export.export_run(run, common.loader(source, "cpu")(), out)
    print(f"{run} (on {source}) -> {path}")
    return path


def _table(top: argparse.Namespace) -> dict:
    drawing = settings.parse(top.parser, top.argv, "table")
    if drawing.draw_only:
        return _redraw_table(drawing)
    from cdist import pipeline, report
    from cdist.provenance import git_commit

    args, ctx = _prepared(top, "table")
    commit = git_commit()
    summary = pipeline.run_stages(ctx)
    # Quoted, so that the recorded command runs as it stands (arm names hold spaces and commas).
    command = shlex.join(["cdist", "table", *top.argv])
    stem = tasks.get_task(args.task).table_stem
    figures = _figures(args)
    for path in report.write_report(summary, figures, stem, command=command, commit=commit):
        print(path)
    print(report.markdown_table(summary))
    return summary


def _redraw_table(args: RunSettings) -> dict:
    """``cdist table --draw-only``: the figures of the table in ``--out`` drawn again from its
    ``results.json``, named by the task that made it; the tables and the run folder are left as
    they are."""
    from cdist import report
    from cdist.checkpoints import read_json

    results = Path(args.out) / "results.json"
    if not results.is_file():
        raise flags.UsageError(f"no table in {args.out} ({results} is missing); run cdist table "
                               f"--out {args.out} first")
    summary = read_json(results, "restore it from git or run the table again")
    figures = run_folder.claim_figures(_figures(args))
    stem = tasks.get_task(summary["config"]["task"]).table_stem
    written = report.write_figures(summary, figures, stem)
    print(f"{len(written)} figure files in {figures}")
    return summary


_HANDLERS = {"discover": _discover, "match": _match, "distill": _distill, "evaluate": _evaluate,
             "table": _table}
