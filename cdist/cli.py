"""The ``cdist`` command line.

    cdist demo [--items N] [--seed S]   # the zoo table, then circuit distillation of et-student at
                                        # a small size
    cdist demo --no-distill             # the zoo table only
    cdist zoo                           # list the zoo models and what their manifests say
"""

from __future__ import annotations

import argparse
import sys
import time

from cdist import evaluate, experiment_cli, zoo
from cdist.zoo.organisms import OrganismConfig, held_out


def zoo_table(items: int, seed: int) -> list[dict]:
    """Each zoo model's accuracy on ``items`` freshly generated test-split items, beside its
    manifest's."""
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


def _demo(args) -> int:
    if not zoo.names():
        print(f"no zoo models in {zoo.zoo_dir()}; train them with `python experiments/zoo.py`",
              file=sys.stderr)
        return 1
    print(f"Zoo models on {args.items} fresh held-out items (seed {args.seed}):")
    print(f"{'model':<14}{'task':<17}{'layers':>7}{'heads':>7}{'d_model':>8}"
          f"{'accuracy':>10}{'manifest':>10}")
    for r in zoo_table(args.items, args.seed):
        print(f"{r['model']:<14}{r['task']:<17}{r['layers']:>7}{r['heads']:>7}{r['d_model']:>8}"
              f"{r['accuracy']:>10.3f}{r['manifest_accuracy']:>10.3f}")
    if args.no_distill:
        return 0
    if not {"et-teacher", "et-student"} <= set(zoo.names()):
        print("the distillation demo needs et-teacher and et-student in the zoo", file=sys.stderr)
        return 1
    started = time.time()
    print("\nCircuit distillation of et-student from et-teacher, reduced size (1 seed, 128 "
          "training items, 150 steps, 5 arms; the full table: "
          "python experiments/entity_tracking.py):", flush=True)
    argv = ["--seeds", "0", "--regimes", "128", "--steps", "150", "--eval-every", "50",
            "--lrs", "1e-3", "--lambdas", "1.0", "--matchers", "ablation-baseline",
            "--val-items", "200", "--test-items", "500", "--ood-items", "200",
            "--arms", "base student", "teacher", "circuit distilled, CE",
            "circuit distilled, CE + Align CKA", "circuit distilled, CE + Shuffled CKA",
            "--out", f"{args.out}/entity_tracking", "--figures", f"{args.out}/figures"]
    experiment_cli.main("entity_tracking", argv)
    print(f"demo distillation: {time.time() - started:.0f} s; tables and figures in "
          f"{args.out}/figures")
    return 0


def _zoo(args) -> int:
    for name in zoo.names():
        m = zoo.manifest(name)
        print(f"{name}: {m['config']['task']}, {m['steps']} steps, {m['wall_time_s']:.0f}s, "
              f"accuracy {m['accuracy']['value']:.3f}, commit {m.get('commit', '?')[:12]}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cdist", description="circuit distillation toolkit")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="print every zoo model's accuracy on fresh held-out data")
    demo.add_argument("--items", type=int, default=1000, help="held-out items per model")
    demo.add_argument("--seed", type=int, default=7, help="seed of the held-out items")
    demo.add_argument("--no-distill", action="store_true", help="only the zoo table")
    demo.add_argument("--out", default="results/demo",
                      help="where the demo's runs, tables and figures go")
    demo.set_defaults(run=_demo)
    sub.add_parser("zoo", help="list the zoo models").set_defaults(run=_zoo)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
