"""``cdist zoo`` (list, train, export the model organisms) and ``cdist demo``.

    cdist zoo list                                  # the zoo models and what their manifests say
    cdist zoo train                                 # every model of cdist.zoo.ZOO_CONFIGS; an
    cdist zoo train --only tom-teacher              # interrupted run resumes from runs/zoo/
    cdist zoo train --tiny                          # a seconds-long smoke run (zoo/et-tiny)
    cdist zoo export et-student ckpt/et-student     # as a transformers checkpoint directory
    cdist zoo circuits                              # every zoo model's circuit, faithfulness,
    cdist zoo circuits --only et-teacher            # scans and heatmaps -> results/discovery/,
    cdist zoo circuits --draw-only                  # figures/discovery/ (or redraw them only)
    cdist demo                                      # the zoo table, then a small distillation
"""

from __future__ import annotations

import time
from pathlib import Path

from cdist import run_folder
from cdist.checkpoints import check_replaceable
from cdist.cli import steps
from cdist.cli.common import set_threads
from cdist.cli.flags import UsageError, add_shared
from cdist.cli.parser import Formatter

__all__ = ["add_parsers"]


def add_parsers(sub) -> None:
    raw = Formatter
    zoo = sub.add_parser("zoo", help="list, train or export the zoo's model organisms",
                         description=__doc__.split("\n\n")[0], formatter_class=raw,
                         epilog="examples:\n" + "\n".join(
                             line for line in __doc__.split("\n\n")[1].splitlines()
                             if "zoo" in line))
    zsub = zoo.add_subparsers(dest="zoo_command", required=True, metavar="ZOO_COMMAND")
    zsub.add_parser("list", help="the zoo models and their manifests").set_defaults(run=_list)
    train = zsub.add_parser("train", help="train zoo models and write them to zoo/",
                            epilog="example:\n  cdist zoo train --only et-teacher et-student",
                            formatter_class=raw)
    train.add_argument("--only", nargs="*", default=None, help="names to train (default: all)")
    train.add_argument("--run-dir", default="runs/zoo",
                       help="where training state is checkpointed")
    train.add_argument("--eval-items", type=int, default=1000,
                       help="held-out items for the final accuracy")
    train.add_argument("--eval-seed", type=int, default=2024, help="seed of the held-out items")
    train.add_argument("--tiny", action="store_true",
                       help="train only zoo.TINY_CONFIG (a seconds-long smoke run)")
    add_shared(train, "threads")
    train.set_defaults(run=_train)
    export = zsub.add_parser("export", help="write a zoo model as a transformers checkpoint",
                             epilog="example:\n  cdist zoo export et-student ckpt/et-student",
                             formatter_class=raw)
    export.add_argument("name", help="a zoo model")
    export.add_argument("out", help="a new checkpoint directory")
    export.set_defaults(run=_export)
    circuits = zsub.add_parser(
        "circuits", help="find, score and draw every zoo model's circuit (the README's table)",
        description="Each zoo model's task circuit by every method its task allows, its "
                    "accuracy and faithfulness against random circuits, and heatmaps of the "
                    "scans (cdist.zoo.survey).",
        epilog="example:\n  cdist zoo circuits --only et-teacher --out runs/survey "
               "--figures runs/survey/figures", formatter_class=raw)
    circuits.add_argument("--only", nargs="*", default=None,
                          help="zoo models (default: every one on disk)")
    circuits.add_argument("--out", default="results/discovery", help="where the results go")
    circuits.add_argument("--figures", default="figures/discovery",
                          help="where the heatmaps go")
    circuits.add_argument("--draw-only", action="store_true",
                          help="only redraw the heatmaps of the scores already in --out")
    circuits.add_argument("--seed", type=int, default=0,
                          help="data seed; the three item sets use seed*3 + 101/102/103")
    add_shared(circuits, "reference-items", "discovery-items")
    circuits.add_argument("--eval-items", type=int, default=1000,
                          help="items for the reported accuracies")
    add_shared(circuits, "k", "min-effect")
    circuits.add_argument("--budget", type=float, default=0.2,
                          help="mean-ablation ranking: largest circuit, share of heads")
    circuits.add_argument("--target", type=float, default=0.8,
                          help="mean-ablation ranking: faithfulness that ends the growth")
    add_shared(circuits, "n-random", "threads")
    circuits.set_defaults(run=_circuits)

    demo = sub.add_parser("demo", help="the zoo table, then a small circuit distillation",
                          epilog="example:\n  cdist demo --no-distill", formatter_class=raw)
    demo.add_argument("--items", type=int, default=1000, help="held-out items per model")
    demo.add_argument("--seed", type=int, default=7, help="seed of the held-out items")
    demo.add_argument("--no-distill", action="store_true", help="only the zoo table")
    demo.add_argument("--out", default="results/demo",
                      help="where the demo's runs, tables and figures go")
    demo.set_defaults(run=_demo)
    for p in (zoo, demo):
        p.set_defaults(parser=p)


def _list(args) -> list[str]:
    from cdist import zoo

    for name in zoo.names():
        m = zoo.manifest(name)
        print(f"{name}: {m['config']['task']}, {m['steps']} steps, {m['wall_time_s']:.0f}s, "
              f"accuracy {m['accuracy']['value']:.3f}, commit {m.get('commit', '?')[:12]}")
    return zoo.names()


def _train(args) -> list[Path]:
    import dataclasses

    from cdist import evaluate, zoo
    from cdist.provenance import git_commit
    from cdist.zoo import organisms

    set_threads(args.threads)
    configs = {zoo.TINY_CONFIG.name: zoo.TINY_CONFIG} if args.tiny else zoo.ZOO_CONFIGS
    names = list(configs) if args.only is None else args.only
    unknown = sorted(set(names) - set(configs))
    if unknown or not names:
        raise UsageError(f"unknown zoo model(s) {unknown or '(none named)'}; choose from "
                         f"{sorted(configs)}")
    if args.eval_items < 1:  # checked now, not after the training it would follow
        raise UsageError(f"--eval-items {args.eval_items}: give at least 1")
    run_folder.check_writable(args.run_dir)
    run_folder.check_writable(zoo.zoo_dir())

    def depth(name: str) -> int:
        """How many init_from steps lead to a model trained from scratch."""
        base = configs[name].init_from
        return 0 if base is None else 1 + depth(base)

    # a model that starts from another (init_from) is trained after it, along any chain
    names.sort(key=depth)
    for name in names:
        base = configs[name].init_from
        if base and base not in names and base not in zoo.names():
            raise UsageError(f"{name} starts from {base}, which is not in {zoo.zoo_dir()}; "
                             f"add it: --only {base} {name}")
    commit = git_commit()  # the code that trains, read before anything else can change the tree
    tokenizer = zoo.organism_tokenizer()
    written = []
    for name in names:
        cfg = configs[name]
        started = time.time()
        model, manifest = organisms.train_organism(cfg, tokenizer, f"{args.run_dir}/{name}",
                                                   init=zoo.init_weights(cfg))
        test = organisms.held_out(cfg, tokenizer, args.eval_items, seed=args.eval_seed)
        acc = evaluate.accuracy(organisms.LogitsOf(model, tokenizer), test)
        manifest |= {
            "name": name, "commit": commit, "n_params": sum(p.numel() for p in model.parameters()),
            "n_heads_total": cfg.n_layers * cfg.n_heads,
            "accuracy": {"test_items": args.eval_items, "seed": args.eval_seed, "value": acc},
            "config": dataclasses.asdict(cfg),
        }
        path = zoo.save(model, tokenizer, name, manifest)
        print(f"{name}: accuracy {acc:.3f} on {args.eval_items} held-out items, "
              f"{manifest['steps']} steps, {time.time() - started:.0f}s -> {path}")
        written.append(path)
    return written


def _export(args) -> Path:
    from cdist import zoo

    if args.name not in zoo.names():
        raise UsageError(f"{args.name!r} is not a zoo model; choose from {zoo.names()}")
    out = check_replaceable(run_folder.check_writable(args.out))
    path = zoo.export_hf(args.name, out)
    print(f"{args.name} -> {path}")
    return path


def _circuits(args) -> list:
    import shlex

    from cdist import zoo
    from cdist.zoo import survey

    run_folder.check_owned(run_folder.check_writable(args.figures))
    if not args.draw_only:
        run_folder.claim(args.out)  # cdist's folder, marked, one process at a time
        names = zoo.names() if args.only is None else args.only
        unknown = sorted(set(names) - set(zoo.names()))
        if unknown or not names:
            raise UsageError(f"not in the zoo: {unknown or '(none named)'}; it has "
                             f"{zoo.names()}")
        cfg = survey.SurveyConfig(
            seed=args.seed, reference_items=args.reference_items,
            discovery_items=args.discovery_items, eval_items=args.eval_items, k=args.k,
            min_effect=args.min_effect, budget=args.budget, target=args.target,
            n_random=args.n_random)
        set_threads(args.threads)
        survey.survey(names, cfg, args.out, command=shlex.join(["cdist", "zoo", *args.argv]),
                      log=lambda line: print(line, flush=True))
        print(f"wrote {args.out}/results.md, results.csv, results.json, circuits/, scores/")
    elif not list(Path(args.out, "scores").glob("*.json")):
        raise UsageError(f"no scores in {args.out}/scores; run `cdist zoo circuits` first")
    written = survey.draw(args.out, run_folder.claim_figures(args.figures))
    print(f"{len(written)} figure files in {args.figures}")
    return written


def zoo_table(items: int, seed: int) -> list[dict]:
    """Each zoo model's accuracy on ``items`` freshly generated test-split items, beside its
    manifest's."""
    from cdist import evaluate, zoo
    from cdist.zoo.organisms import OrganismConfig, held_out

    rows = []
    for name in zoo.names():
        manifest = zoo.manifest(name)
        cfg = OrganismConfig.from_dict({**manifest["config"], "stop_window": None})
        model, tokenizer = zoo.load(name)
        started = time.time()
        acc = evaluate.accuracy(model, held_out(cfg, tokenizer, items, seed=seed))
        rows.append({
            "model": name, "task": cfg.task, "layers": cfg.n_layers,
            "heads": cfg.n_layers * cfg.n_heads, "d_model": cfg.d_model, "accuracy": acc,
            "manifest_accuracy": manifest["accuracy"]["value"], "seconds": time.time() - started,
        })
    return rows


def _demo(args) -> list[dict]:
    from cdist import zoo

    if not zoo.names():
        raise UsageError(f"no zoo models in {zoo.zoo_dir()}; train them with `cdist zoo train`")
    if args.items < 1:
        raise UsageError(f"--items {args.items}: give at least 1")
    if not args.no_distill:
        run_folder.check_writable(args.out)
    print(f"Zoo models on {args.items} fresh held-out items (seed {args.seed}):")
    rows = zoo_table(args.items, args.seed)
    name_w = max(len("model"), *(len(r["model"]) for r in rows)) + 2
    task_w = max(len("task"), *(len(r["task"]) for r in rows)) + 2
    print(f"{'model':<{name_w}}{'task':<{task_w}}{'layers':>7}{'heads':>7}{'d_model':>8}"
          f"{'accuracy':>10}{'manifest':>10}")
    for r in rows:
        print(f"{r['model']:<{name_w}}{r['task']:<{task_w}}{r['layers']:>7}{r['heads']:>7}"
              f"{r['d_model']:>8}{r['accuracy']:>10.3f}{r['manifest_accuracy']:>10.3f}")
    if args.no_distill:
        return rows
    if not {"et-teacher", "et-student"} <= set(zoo.names()):
        raise UsageError("the distillation demo needs et-teacher and et-student in the zoo; "
                         "train them with `cdist zoo train --only et-teacher et-student`")
    started = time.time()
    print("\nCircuit distillation of et-student from et-teacher, reduced size (1 seed, 128 "
          "training items, 150 steps, 5 arms; the full table: cdist table):", flush=True)
    steps.run_step("table", [
        "--task", "entity_tracking", "--seeds", "0", "--regimes", "128", "--steps", "150",
        "--eval-every", "50", "--lrs", "1e-3", "--lambdas", "1.0", "--matchers",
        "ablation-baseline", "--val-items", "200", "--test-items", "500", "--ood-items", "200",
        "--arms", "base student", "teacher", "circuit distilled, CE",
        "circuit distilled, CE + Align CKA", "circuit distilled, CE + Shuffled CKA",
        "--out", f"{args.out}/entity_tracking", "--figures", f"{args.out}/figures"])
    from cdist.report_page import write_run_page

    page = write_run_page(f"{args.out}/entity_tracking")
    print(f"demo distillation: {time.time() - started:.0f} s; tables and figures in "
          f"{args.out}/figures; the run's page: {page}")
    return rows
