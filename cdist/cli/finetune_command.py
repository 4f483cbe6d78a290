"""``cdist finetune``: a checkpoint fine-tuned on a task, as a teacher (or a warm student) the other
steps load (``cdist.finetune``)."""

from __future__ import annotations

import argparse
import shlex

from cdist.cli import common, flags
from cdist.cli.parser import Formatter

__all__ = ["add_parsers"]

_EXAMPLE = """\
cdist finetune --model smollm2.gguf --task entity_tracking --template prakash \\
    --n-boxes 2 3 4 5 6 7 --steps 100 --out teachers/smollm2-et
cdist finetune --model smollm2.gguf --keep-layers 0-11 20-29 --steps 10 --out students/smollm2-22
cdist finetune --model et-student --heads a1.h3 a1.h5 --lr 1e-3 --out runs/heads-only
# then: cdist discover --teacher teachers/smollm2-et/model ..."""


def _layers(text: str) -> list[int]:
    """``A-B`` (inclusive) or ``A``."""
    try:
        first, _, last = text.partition("-")
        return list(range(int(first), int(last or first) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give a layer or a range such as 0-11") \
            from None


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "finetune", help="fine-tune a checkpoint on a task (a teacher that does the task)",
        description="Fine-tune a model on a task against the items' own answers: every weight, "
                    "or only --heads, optionally of a shallower copy (--keep-layers). Writes "
                    "OUT/model (a transformers checkpoint the other steps load), OUT/run (the "
                    "resumable training run) and OUT/finetune.json (settings, commit, "
                    "fingerprints, validation accuracy before and after). The same command "
                    "resumes an interrupted run and reuses a finished one.",
        epilog="examples:\n  " + _EXAMPLE.replace("\n", "\n  "), formatter_class=Formatter)
    p.add_argument("--model", required=True,
                   help="zoo name, checkpoint directory or .gguf file to start from")
    p.add_argument("--out", required=True,
                   help="the folder it works in (new, empty, or one this command made)")
    p.add_argument("--task", default="entity_tracking", type=flags.task_name,
                   help="a registered task or a task file (default: %(default)s)")
    p.add_argument("--template", default=None, help="the task's template (default: its real one)")
    p.add_argument("--n-boxes", type=int, nargs="+", default=None, metavar="N",
                   help="entity tracking: boxes per item; several make an even mix")
    p.add_argument("--keep-layers", type=_layers, nargs="+", default=None, metavar="A-B",
                   help="fine-tune a copy with only these layers (ranges, inclusive)")
    p.add_argument("--heads", nargs="+", default=None, metavar="HEAD",
                   help="train only these heads, e.g. a3.h1 (default: every weight)")
    p.add_argument("--kv-policy", choices=["qo", "group"], default="qo",
                   help="with --heads: qo trains their W_Q/W_O, group their key/value groups too")
    p.add_argument("--train-items", type=int, default=3000, help="items trained on")
    p.add_argument("--val-items", type=int, default=120, help="held-out items, logged")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    p.add_argument("--batch-size", type=int, default=16, help="items per step")
    p.add_argument("--eval-every", type=int, default=5, help="steps between evaluations")
    p.add_argument("--seed", type=int, default=0, help="items and data order")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if present)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--portable", action="store_true",
                   help="CPU arithmetic pinned (AVX2 kernels, one thread) so that any x86-64 "
                        "machine makes the same weights, the same fingerprint (cdist.numerics)")
    p.set_defaults(run=_finetune, parser=p)


def _finetune(args: argparse.Namespace) -> dict:
    from cdist import limits, tasks, zoo
    from cdist.finetune import FinetuneConfig, finetune

    spec = tasks.get_task(args.task)
    # a task file's items are its rows: a zoo model takes them as they are
    organism = (zoo.manifest(args.model)["config"]
                if args.model in zoo.names() and spec.size is None else None)
    if organism is not None and organism["task"] != args.task:
        raise flags.UsageError(f"--model {args.model} was trained on {organism['task']}, not "
                               f"{args.task}; pass --task {organism['task']}")
    own = common.organism_kwargs(spec, organism) if organism is not None else {}
    keep = None if args.keep_layers is None else tuple(i for r in args.keep_layers for i in r)
    try:
        limits.check_seed("seed", args.seed)
        cfg = FinetuneConfig(
            task=args.task, template=args.template, task_kwargs=own,
            n_boxes=tuple(args.n_boxes) if args.n_boxes else None,
            train_items=args.train_items, val_items=args.val_items, steps=args.steps,
            lr=args.lr, batch_size=args.batch_size, eval_every=args.eval_every, seed=args.seed,
            heads=tuple(args.heads) if args.heads else None, kv_policy=args.kv_policy,
            keep_layers=keep, numerics="portable" if args.portable else "native")
    except ValueError as e:  # ConfigError is one, and so is a bad head name
        raise flags.UsageError(str(e)) from None
    if args.portable and args.threads not in (None, 1):
        raise flags.UsageError(f"--portable runs on one thread; leave out --threads {args.threads}")
    common.set_threads(args.threads)
    dev = common.pick_device(args.device)
    if args.portable:
        if dev != "cpu":
            raise flags.UsageError(f"--portable pins CPU arithmetic; add --device cpu (not {dev})")
        from cdist import numerics

        numerics.pin()  # before the model loads: torch chooses its kernels at the first one
    model = common.loader(args.model, dev)()
    record = finetune(model, cfg, args.out, source=args.model,
                      command=shlex.join(["cdist", "finetune", *args.argv]))
    said = "reused, " if record.get("reused") else ""
    print(f"{args.model} -> {record['model']} ({said}{record['layers']} layers, "
          f"{_trained(record['trained_heads'])}): validation accuracy "
          f"{record['val_accuracy_before']:.3f} -> {record['val_accuracy_after']:.3f} on "
          f"{record['val_items']} items in {cfg.steps} steps")
    return record


def _trained(heads: list[str]) -> str:
    return "every weight" if not heads else f"{len(heads)} head{'s' if len(heads) > 1 else ''}"
