"""Command line of ``experiments/entity_tracking.py`` and ``experiments/theory_of_mind.py``
(``cdist.experiment``).

Zoo names or local Llama checkpoint directories; every choice of the experiment is a flag, grouped
as the experiment's steps are, and the resolved config is written beside the results.
"""

from __future__ import annotations

import argparse
import inspect
import shlex
import sys
from dataclasses import replace
from pathlib import Path

import torch

from cdist import arms, discovery, distill, models, report, tasks, zoo
from cdist.experiment import MATCHERS, ExperimentConfig, run_experiment
from cdist.provenance import git_commit

__all__ = ["main"]

# The kinds of OOD set that --ood-boxes and --ood-templates name: generator keyword -> label.
_OOD_LABELS = {"n_boxes": "{} boxes", "template": "template {}"}
# Learning rates by kind of model. Zoo organisms: circuit CE needs about 1e-3 to move in a few
# hundred steps. Pretrained checkpoints: around the paper's 2e-5 (Llama-3, thousands of steps) and
# up, since a run here is hundreds of steps and trains a few heads' W_Q / W_O slices only.
LRS = {"zoo": (3e-4, 1e-3, 3e-3), "pretrained": (3e-5, 1e-4, 3e-4)}
CONTROL_LR = {"zoo": 3e-4, "pretrained": 3e-5}


def _parser(task: str) -> argparse.ArgumentParser:
    spec = tasks.get_task(task)
    teacher, student = spec.default_models or (None, None)
    description = (f"Circuit distillation for {task}: every arm over seeds and training regimes, "
                   "hyperparameters chosen on validation items (cdist.experiment).")
    p = argparse.ArgumentParser(description=description)
    g = p.add_argument_group("models and output")
    for role, default in (("teacher", teacher), ("student", student)):
        g.add_argument(f"--{role}", default=default, required=default is None,
                       help="zoo name or checkpoint directory")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda")
    g.add_argument("--out", default=f"results/{task}",
                   help="runs, circuits, results.json and per_item.json")
    g.add_argument("--figures", default="figures", help="where the tables and figures go")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    g = p.add_argument_group("design")
    g.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4],
                   help="the table's seeds")
    g.add_argument("--select-seed", type=int, default=100,
                   help="seed of the selection runs (not a table seed)")
    g.add_argument("--regimes", type=int, nargs="+", default=[128, 2000],
                   help="training items; the first is primary")
    g.add_argument("--arms", nargs="+", default=[a.name for a in arms.ARMS],
                   help="which arms (default: all)")
    g.add_argument("--val-items", type=int, default=500,
                   help="validation items (selection and curves)")
    g.add_argument("--test-items", type=int, default=1000,
                   help="test items (entity tracking: 7 boxes unless --n-boxes)")
    g.add_argument("--ood-items", type=int, default=500, help="items per out-of-distribution set")
    g.add_argument("--reference-items", type=int, default=500,
                   help="items whose head means mean ablation writes")
    g.add_argument("--discovery-items", type=int, default=200,
                   help="items the circuits are found on")
    g.add_argument("--n-random", type=int, default=5,
                   help="random circuits of the circuit's size per evaluation")
    g.add_argument("--data-seed", type=int, default=0, help="seed of every item set")
    g = p.add_argument_group("items (default: the student's, a zoo organism's own; "
                             f"{spec.real_template!r} for a checkpoint)")
    g.add_argument("--template", choices=sorted(spec.templates), default=None,
                   help="the template of the training, validation and test items")
    if "n_boxes" in inspect.signature(spec.generate).parameters:
        g.add_argument("--n-boxes", type=int, default=None,
                       help="boxes per item in the training, validation and test items "
                            "(default: the organism's, else the generator's)")
    for role in spec.word_lists:
        g.add_argument(f"--{role.replace('_', '-')}", nargs="+", default=None, metavar="WORD",
                       help=f"the {role} words, each one token for the models' tokenizer "
                            "(default: the generator's list, less the words that are not)")
    g.add_argument("--ood-boxes", type=int, nargs="*", default=None,
                   help="other box counts tested, replacing the task's default ones (entity "
                   "tracking: 3 10); ignored by a task that tests none by default")
    g.add_argument("--ood-templates", nargs="*", default=None,
                   help="other templates tested, replacing the task's default ones (entity "
                   "tracking: bridge_context for the zoo, compact else); ignored by a task that "
                   "tests none by default")
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=600, help="optimizer steps per run")
    g.add_argument("--eval-every", type=int, default=25,
                   help="steps between validation evaluations")
    g.add_argument("--batch-size", type=int, default=32, help="prompts per step (the m of CKA)")
    g.add_argument("--lrs", type=float, nargs="+", default=None,
                   help=f"learning rates tried for circuit CE (default: {LRS['zoo']} for zoo "
                        f"students, {LRS['pretrained']} for checkpoints; the paper: 2e-5 for "
                        "Llama-3)")
    g.add_argument("--lambdas", type=float, nargs="+", default=[0.1, 0.3, 1.0, 3.0, 10.0],
                   help="CKA weights tried")
    g.add_argument("--control-lr", type=float, default=None,
                   help=f"learning rate of the positive control (default: {CONTROL_LR['zoo']} "
                        f"for zoo students, {CONTROL_LR['pretrained']} for checkpoints)")
    g.add_argument("--kv-policy", choices=["qo", "group"], default="qo",
                   help="qo: only the heads' W_Q/W_O train; group: their key/value groups too")
    g = p.add_argument_group("circuits and matching")
    g.add_argument("--k", type=int, default=2,
                   help="entity tracking: heads per path-patching group")
    g.add_argument("--min-effect", type=discovery.parse_min_effect, default="noise",
                   help="entity tracking: a head's -relative change must exceed 2 standard errors "
                        "over the items (noise, the default) or this number")
    g.add_argument("--prefilter", type=int, default=None,
                   help="entity tracking's searches (the teacher's, and the student's if it "
                        "searches): scan exactly only the N senders per group that path "
                        "attribution ranks first (for deep models; default: every head)")
    g.add_argument("--student-method", default="mean_ablation",
                   choices=["auto", "path_patching", "mean_ablation"],
                   help="how the student's circuit is found (auto: as the teacher's, by task)")
    g.add_argument("--matchers", nargs="+", choices=MATCHERS, default=list(MATCHERS),
                   help="matchers tried")
    g.add_argument("--one-to-one", action="store_true",
                   help="assign each teacher head at most once")
    g.add_argument("--cka-position", default=None,
                   help="read every pair at this position column instead of its teacher head's "
                   "position")
    g.add_argument("--teacher-positions", nargs="*", default=[], metavar="HEAD=COLUMN",
                   help="name a teacher head's position, e.g. a0.h3=pos_prev_label")
    return p


def _ood(spec: tasks.Task, organism: bool, given: dict) -> tuple[tuple[str, dict], ...]:
    """The task's default out-of-distribution sets, each kind (``n_boxes``, ``template``) replaced
    by the values ``given`` for it (a flag's values; None keeps the defaults), kinds in the
    defaults' order."""
    defaults = spec.default_ood(organism)
    kinds = dict.fromkeys(key for _, overrides in defaults for key in overrides)
    ood = []
    for kind in kinds:
        if given.get(kind) is None:
            ood += [s for s in defaults if kind in s[1]]
        else:
            ood += [(_OOD_LABELS[kind].format(v), {kind: v}) for v in given[kind]]
    return tuple(ood)


def main(task: str, argv: list[str] | None = None) -> dict:
    """Parse ``argv``, run the experiment, write its report; bad input exits with status 2 and one
    line."""
    parser = _parser(task)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in args.arms:
        try:
            arms.arm(name)
        except ValueError as e:
            parser.error(str(e))
    positions = {}
    for item in args.teacher_positions:
        head, sep, column = item.partition("=")
        if not sep:  # the head name and the column are checked by ExperimentConfig
            parser.error(f"--teacher-positions {item!r}: write HEAD=COLUMN, "
                         "e.g. a0.h3=pos_prev_label")
        positions[head] = column

    def loader(source: str):
        if source in zoo.names():
            return lambda: zoo.load(source, device=args.device)[0].eval()
        if Path(source).is_dir() or (source.endswith(".gguf") and Path(source).is_file()):
            dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
            return lambda: models.load_llama(source, device=args.device, dtype=dtype).eval()
        parser.error(f"{source!r} is neither a zoo model ({zoo.names()}) nor a checkpoint "
                     "directory or .gguf file")

    spec = tasks.get_task(task)
    organism = zoo.manifest(args.student)["config"] if args.student in zoo.names() else None
    if organism:
        task_kwargs = {"template": organism["template"], **organism.get("task_kwargs", {})}
        task_kwargs |= {k: organism[k] for k in spec.organism_kwargs}
    else:
        task_kwargs = {"template": spec.real_template}
    if args.template is not None:
        task_kwargs["template"] = args.template
    if getattr(args, "n_boxes", None) is not None:
        task_kwargs["n_boxes"] = args.n_boxes
    for role in spec.word_lists:
        if getattr(args, role) is not None:
            task_kwargs[role] = list(getattr(args, role))
    kind = "zoo" if organism else "pretrained"
    lrs = args.lrs or LRS[kind]
    control_lr = args.control_lr if args.control_lr is not None else CONTROL_LR[kind]
    ood = _ood(spec, bool(organism), {"n_boxes": args.ood_boxes, "template": args.ood_templates})
    try:
        base = distill.DistillConfig(steps=args.steps, batch_size=args.batch_size,
                                     kv_policy=args.kv_policy, eval_every=args.eval_every,
                                     cka_position=args.cka_position)
        cfg = ExperimentConfig(
            task=task, task_kwargs=task_kwargs, seeds=tuple(args.seeds),
            select_seed=args.select_seed, regimes=tuple(args.regimes), val_items=args.val_items,
            test_items=args.test_items, ood=ood, reference_items=args.reference_items,
            discovery_items=args.discovery_items, n_random=args.n_random, data_seed=args.data_seed,
            ood_items=args.ood_items, lrs=tuple(lrs), lambdas=tuple(args.lambdas),
            matchers=tuple(args.matchers), one_to_one=args.one_to_one, control_lr=control_lr,
            teacher_positions=positions, distill=base,
            discovery=discovery.DiscoveryConfig(k=args.k, min_effect=args.min_effect,
                                                prefilter=args.prefilter),
            student_discovery=replace(ExperimentConfig.student_discovery,
                                      method=args.student_method, k=args.k,
                                      min_effect=args.min_effect, prefilter=args.prefilter),
            arms=tuple(a.name for a in arms.ARMS if a.name in args.arms),
        )
    except ValueError as e:
        parser.error(str(e))
    commit = git_commit()
    try:
        summary = run_experiment(cfg, loader(args.teacher), loader(args.student), args.out,
                                 names=(args.teacher, args.student))
    except ValueError as e:
        # a stale run folder, an empty circuit, a missing column: one line, not a traceback
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    # Quoted, so that the recorded command runs as it stands (arm names hold spaces and commas).
    command = "python " + shlex.join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    for path in report.write_report(summary, args.figures, spec.table_stem, command=command,
                                    commit=commit):
        print(path)
    print(report.markdown_table(summary))
    return summary
