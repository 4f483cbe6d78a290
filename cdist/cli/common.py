"""What the ``cdist`` subcommands share: the flags of a run, config files, the run folder's
memory of its settings, model loading, and one-line errors.

A run folder (``--out``) is where each step leaves what the next one reads (circuits, scans, head
maps, trained runs; ``cdist.pipeline``), and ``config.yaml`` there keeps the settings its steps
used. A step's settings come from, lowest first: the flags' defaults, the run folder's
``config.yaml``, a ``--config`` file (TOML or YAML), and the flags given. So ``cdist discover
--val-items 100 --out R`` followed by ``cdist match --out R`` matches on the same items, and
``cdist table --config R/config.yaml --out R2`` re-makes a run from its record.

Only the standard library and cdist's light modules (the task registry, the arms' names) are
imported here, so that ``--help`` answers at once; torch comes in when a command runs.
"""

from __future__ import annotations

import argparse
import inspect
import shlex
import time
from pathlib import Path

from cdist import arms, tasks
from cdist.errors import ConfigError
from cdist.tasks.registry import TASKS

__all__ = ["CONTROL_LR", "LRS", "UsageError", "add_flags", "parse", "parse_min_effect"]

# Learning rates by kind of student. Zoo organisms: circuit CE needs about 1e-3 to move in a few
# hundred steps. Pretrained checkpoints: around the paper's 2e-5 (Llama-3, thousands of steps) and
# up, since a run here is hundreds of steps and trains a few heads' W_Q / W_O slices only.
LRS = {"zoo": (3e-4, 1e-3, 3e-3), "pretrained": (3e-5, 1e-4, 3e-4)}
CONTROL_LR = {"zoo": 3e-4, "pretrained": 3e-5}
RUN_CONFIG = "config.yaml"
# Settings of the machine, of one invocation or of one training run, which a run folder does not
# hand on to its next step (a second `cdist distill` there is another run, not the same again).
_NOT_KEPT = {"command", "config", "out", "device", "threads", "figures", "roles", "arm", "matcher",
             "lr", "lam", "seed", "train_items"}
# The kinds of OOD set that --ood-boxes and --ood-templates name: generator keyword -> label.
_OOD_LABELS = {"n_boxes": "{} boxes", "template": "template {}"}


class UsageError(ConfigError):
    """A command line the user can fix: ``cdist`` prints it as one line and exits with status
    2."""


def parse_min_effect(text: str) -> float | str:
    """A command line's ``--min-effect``: ``noise`` or a number >= 0 (argparse type)."""
    if text == "noise":
        return text
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is neither 'noise' nor a number >= 0")
    return value


# ---------------------------------------------------------------------------- flags
def add_flags(p: argparse.ArgumentParser, groups: tuple[str, ...], *, roles=("teacher", "student"),
              default_task: str | None = None) -> None:
    """The flag groups a subcommand takes: ``run`` (models, task, output), ``items``,
    ``discovery``, ``matching``, ``training`` and ``design`` (the table's seeds, regimes, arms and
    grids)."""
    g = p.add_argument_group("models and output")
    for role in roles:
        g.add_argument(f"--{role}", default=None,
                       help="zoo name, checkpoint directory or .gguf file (default: the run "
                            "folder's, else the task's zoo pair)")
    g.add_argument("--task", default=default_task, choices=sorted(TASKS),
                   help="the task (default: the run folder's, else entity_tracking)")
    g.add_argument("--out", default=None,
                   help="the run folder every step reads and writes (default: results/<task>)")
    g.add_argument("--config", default=None,
                   help="a TOML or YAML file of settings (flag names as keys); flags override it")
    g.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if present)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    if "items" in groups:
        _items_flags(p)
    if "discovery" in groups:
        _discovery_flags(p)
    if "matching" in groups:
        _matching_flags(p)
    if "training" in groups:
        _training_flags(p)
    if "design" in groups:
        _design_flags(p)


def _items_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("items (default: a zoo student's own; the task's real template for a "
                             "checkpoint)")
    g.add_argument("--val-items", type=int, default=500,
                   help="validation items (selection, matching and curves)")
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
    templates = sorted({t for spec in TASKS.values() for t in spec.templates})
    g.add_argument("--template", choices=templates, default=None,
                   help="the template of the training, validation and test items")
    g.add_argument("--n-boxes", type=int, default=None,
                   help="entity tracking: boxes per item in the training, validation and test "
                        "items (default: the organism's, else the generator's)")
    roles = {role: name for name, spec in sorted(TASKS.items()) for role in spec.word_lists}
    for role, task in roles.items():
        g.add_argument(f"--{role.replace('_', '-')}", nargs="+", default=None, metavar="WORD",
                       help=f"{task.replace('_', ' ')}: the {role} words, each one token for the "
                            "models' tokenizer (default: the generator's list, less the words "
                            "that are not)")
    g.add_argument("--ood-boxes", type=int, nargs="*", default=None,
                   help="other box counts tested, replacing the task's default ones (entity "
                        "tracking: 3 10); ignored by a task that tests none by default")
    g.add_argument("--ood-templates", nargs="*", default=None,
                   help="other templates tested, replacing the task's default ones (entity "
                        "tracking: bridge_context for the zoo, compact else)")


def _discovery_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("circuits")
    g.add_argument("--k", type=int, default=2,
                   help="entity tracking: heads per path-patching group")
    g.add_argument("--min-effect", type=parse_min_effect, default="noise",
                   help="entity tracking: a head's -relative change must exceed 2 standard errors "
                        "over the items (noise, the default) or this number")
    g.add_argument("--prefilter", type=int, default=None,
                   help="entity tracking's searches: scan exactly only the N senders per group "
                        "that path attribution ranks first (for deep models; default: every head)")
    g.add_argument("--student-method", default="mean_ablation",
                   choices=["auto", "path_patching", "mean_ablation"],
                   help="how the student's circuit is found (auto: as the teacher's, by task)")


def _matching_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("matching")
    g.add_argument("--matchers", nargs="+", choices=arms.MATCHERS, default=list(arms.MATCHERS),
                   help="matchers made (cdist match) or tried (cdist table)")
    g.add_argument("--one-to-one", action=argparse.BooleanOptionalAction, default=False,
                   help="assign each teacher head at most once")
    g.add_argument("--cka-position", default=None,
                   help="read every pair at this position column instead of its teacher head's "
                        "position")
    g.add_argument("--teacher-positions", nargs="*", default=[], metavar="HEAD=COLUMN",
                   help="name a teacher head's position, e.g. a0.h3=pos_prev_label")


def _training_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=600, help="optimizer steps per run")
    g.add_argument("--eval-every", type=int, default=25,
                   help="steps between validation evaluations")
    g.add_argument("--batch-size", type=int, default=32, help="prompts per step (the m of CKA)")
    g.add_argument("--kv-policy", choices=["qo", "group"], default="qo",
                   help="qo: only the heads' W_Q/W_O train; group: their key/value groups too")
    g.add_argument("--control-lr", type=float, default=None,
                   help=f"learning rate of the positive control (default: {CONTROL_LR['zoo']} "
                        f"for zoo students, {CONTROL_LR['pretrained']} for checkpoints)")


def _design_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("the table's design")
    g.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4],
                   help="the table's seeds")
    g.add_argument("--select-seed", type=int, default=100,
                   help="seed of the selection runs (not a table seed)")
    g.add_argument("--regimes", type=int, nargs="+", default=[128, 2000],
                   help="training items; the first is primary")
    g.add_argument("--arms", nargs="+", default=[a.name for a in arms.ARMS],
                   help="which arms (default: all)")
    g.add_argument("--lrs", type=float, nargs="+", default=None,
                   help=f"learning rates tried for circuit CE (default: {LRS['zoo']} for zoo "
                        f"students, {LRS['pretrained']} for checkpoints; the paper: 2e-5 for "
                        "Llama-3)")
    g.add_argument("--lambdas", type=float, nargs="+", default=[0.1, 0.3, 1.0, 3.0, 10.0],
                   help="CKA weights tried")


# ---------------------------------------------------------------------------- settings
def read_settings(path: Path) -> dict:
    """A config file's settings: TOML by its suffix, else YAML (JSON is YAML)."""
    try:
        text = path.read_text()
    except OSError as e:
        raise UsageError(f"config file {path}: {e.strerror or e}") from None
    try:
        if path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # tomllib's and yaml's own errors, with the line they stopped at
        kind = "TOML" if path.suffix == ".toml" else "YAML"
        mark = getattr(e, "problem_mark", None)
        why = (f"{e.problem} at line {mark.line + 1}" if mark is not None
               else str(e).splitlines()[0])
        raise UsageError(f"config file {path} is not valid {kind}: {why}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"config file {path}: expected a table of settings, got a "
                         f"{type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}


def _argv(parser: argparse.ArgumentParser, settings: dict, where: str) -> list[str]:
    """``settings`` as the flags that would set them, so that argparse checks their types."""
    flags, argv = _flags(parser), []
    for key, value in settings.items():
        action = flags.get(key)
        if action is None:
            raise UsageError(f"{where}: unknown setting {key!r} for this command; known: "
                             f"{', '.join(sorted(flags))}")
        if value is None:
            continue
        option = action.option_strings[0]
        if isinstance(action, (argparse.BooleanOptionalAction, argparse._StoreTrueAction)) \
                and not isinstance(value, bool):  # YAML's "false" is a true string
            raise UsageError(f"{where}: {key} = {value!r}; write true or false")
        if isinstance(action, argparse.BooleanOptionalAction):
            argv.append(option if value else "--no-" + option.removeprefix("--"))
        elif isinstance(action, argparse._StoreTrueAction):
            argv += [option] if value else []
        elif action.nargs in ("+", "*"):
            argv += [option, *map(str, value if isinstance(value, list) else [value])]
        else:
            argv += [option, str(value)]
    # argparse checks the values' types and choices here, so that an error names the file
    parser.exit_on_error = False
    try:
        parser.parse_args(argv)
    except argparse.ArgumentError as e:
        raise UsageError(f"{where}: {e}") from None
    finally:
        parser.exit_on_error = True
    return argv


def parse(parser: argparse.ArgumentParser, argv: list[str], command: str) -> argparse.Namespace:
    """``argv`` parsed over the run folder's settings and the ``--config`` file's (module doc)."""
    first = parser.parse_args(argv)
    spec = tasks.get_task(first.task or "entity_tracking")
    out = Path(first.out or f"results/{spec.name}")
    layers = []
    saved = out / RUN_CONFIG
    if saved.is_file():
        known = _flags(parser)
        kept = {k: v for k, v in read_settings(saved).items() if k in known}
        layers.append(_argv(parser, kept, str(saved)))
    if first.config:
        layers.append(_argv(parser, read_settings(Path(first.config)), first.config))
    args = parser.parse_args([*(flag for layer in layers for flag in layer), *argv])
    args.task = args.task or "entity_tracking"
    args.named_roles = tuple(r for r in ("teacher", "student") if getattr(first, r, None))
    args.out = str(out)
    args.command, args.argv = command, list(argv)
    for role in ("teacher", "student"):
        if hasattr(args, role) and getattr(args, role) is None:
            pair = tasks.get_task(args.task).default_models
            if pair is None:
                raise UsageError(f"--{role}: {args.task} has no zoo pair; name a zoo model, "
                                 "checkpoint directory or .gguf file")
            setattr(args, role, pair[role == "student"])
    return args


def keep_settings(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Write the run folder's ``config.yaml`` (its settings merged with this step's) and append the
    command to its ``commands.log``, before the step does any work."""
    import yaml

    from cdist.checkpoints import atomic_write_text, is_follower
    from cdist.provenance import git_commit

    if is_follower():  # under torchrun rank 0 keeps the folder's records
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    saved = out / RUN_CONFIG
    settings = read_settings(saved) if saved.is_file() else {}
    settings |= {k: getattr(args, k) for k in _flags(parser) if k not in _NOT_KEPT}
    settings["task"] = args.task
    commit = git_commit()
    header = (f"# cdist run folder settings, last written by `cdist {args.command}` at commit "
              f"{commit}, {time.strftime('%Y-%m-%d %H:%M:%S')}.\n# Re-make a step: cdist "
              f"{args.command} --config {saved} --out NEW_FOLDER\n")
    atomic_write_text(header + yaml.safe_dump(settings, sort_keys=True), saved)
    with open(out / "commands.log", "a") as log:
        log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {commit} "
                  f"{shlex.join(['cdist', args.command, *args.argv])}\n")


# ---------------------------------------------------------------------------- models and configs
def device(args: argparse.Namespace) -> str:
    """The device named, checked to exist, or cuda when present; under ``torchrun`` this rank's
    GPU (``cdist.distributed``)."""
    import torch

    from cdist import distributed
    from cdist.errors import InputError
    from cdist.models import check_device

    chosen = args.device
    if chosen is None:
        chosen = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        try:
            check_device(chosen)
        except InputError as e:
            raise UsageError(f"--device: {e}; pass one of those") from None
    try:
        return distributed.init_from_env(chosen)  # under torchrun: join the ranks, take a GPU each
    except ValueError as e:
        raise UsageError(f"--device: {e}") from None


def loader(source: str, dev: str):
    """A function that loads ``source`` (a zoo name, checkpoint directory or .gguf file)."""
    import torch

    from cdist import models, zoo

    if source in zoo.names():
        return lambda: zoo.load(source, device=dev)[0].eval()
    if Path(source).is_dir() or (source.endswith(".gguf") and Path(source).is_file()):
        dtype = torch.bfloat16 if dev.startswith("cuda") else torch.float32
        return lambda: models.load_llama(source, device=dev, dtype=dtype).eval()
    raise UsageError(f"{source!r} is neither a zoo model ({', '.join(zoo.names())}) nor a "
                     "checkpoint directory or .gguf file")


def set_threads(threads: int | None) -> None:
    """``--threads``: torch's CPU threads, or torch's default when not given."""
    if threads is not None and threads < 1:
        raise UsageError(f"--threads {threads}: give 1 or more (or leave it out)")
    if threads:
        import torch

        torch.set_num_threads(threads)


def _opened(source: str):
    """``source`` (a zoo name or a checkpoint) opened, its files checked from their headers."""
    from cdist import zoo
    from cdist.llama_files import open_llama

    opened = open_llama(zoo.zoo_dir() / source if source in zoo.names() else source)
    opened.check()
    return opened


def check_tokenizers(opened: dict, toks: dict, names: tuple[str, str]) -> None:
    """Refuse, before either model loads, a teacher and a student (opened checkpoints, and their
    tokenizers) of other vocabularies or tokenizers (``distill.check_pair`` checks loaded models
    the same way)."""
    from cdist.errors import MismatchError
    from cdist.tokenizers import tokenizer_difference

    sizes = [opened[r].hf_config.vocab_size for r in ("teacher", "student")]
    if sizes[0] != sizes[1]:
        raise MismatchError(f"--teacher {names[0]} has {sizes[0]} output tokens and --student "
                            f"{names[1]} {sizes[1]}; distil between models of one tokenizer")
    pair = [toks["teacher"], toks["student"]]
    difference = None if None in pair else tokenizer_difference(*pair)
    if difference:
        raise MismatchError(f"--teacher {names[0]} and --student {names[1]} have other "
                            f"tokenizers: {difference}; distil between models of one tokenizer")


def _ood(spec, organism: bool, given: dict) -> tuple[tuple[str, dict], ...]:
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


def experiment_config(args: argparse.Namespace):
    """The ``ExperimentConfig`` the flags describe (flags a command does not take keep the
    config's defaults, so its steps make the same items as a table would)."""
    from dataclasses import replace

    from cdist import discovery, distill, zoo
    from cdist.pipeline.config import ExperimentConfig

    spec = tasks.get_task(args.task)
    for role in ("teacher", "student"):
        name = getattr(args, role, None)
        trained_on = zoo.manifest(name)["config"]["task"] if name in zoo.names() else None
        if trained_on not in (None, args.task):
            from cdist.errors import MismatchError

            raise MismatchError(f"--{role} {name} was trained on {trained_on}, not {args.task}; "
                                f"pass --task {trained_on} or a {args.task} model")
    student = getattr(args, "student", None) or getattr(args, "teacher", None)
    organism = zoo.manifest(student)["config"] if student in zoo.names() else None
    if organism:
        task_kwargs = {"template": organism["template"], **organism.get("task_kwargs", {})}
        task_kwargs |= {k: organism[k] for k in spec.organism_kwargs}
    else:
        task_kwargs = {"template": spec.real_template}
    if getattr(args, "template", None) is not None:
        if args.template not in spec.templates:
            raise UsageError(f"--template {args.template}: {args.task} has templates "
                             f"{sorted(spec.templates)}")
        task_kwargs["template"] = args.template
    if getattr(args, "n_boxes", None) is not None:
        if "n_boxes" not in inspect.signature(spec.generate).parameters:
            raise UsageError(f"--n-boxes: {args.task} has no boxes")
        task_kwargs["n_boxes"] = args.n_boxes
    for role in {r for s in TASKS.values() for r in s.word_lists}:
        if getattr(args, role, None) is not None:
            if role not in spec.word_lists:
                raise UsageError(f"--{role.replace('_', '-')}: {args.task} has no {role}; its "
                                 f"word lists are {sorted(spec.word_lists)}")
            task_kwargs[role] = list(getattr(args, role))
    kind = "zoo" if organism else "pretrained"
    positions = {}
    for item in getattr(args, "teacher_positions", []):
        head, sep, column = item.partition("=")
        if not sep:  # the head name and the column are checked by ExperimentConfig
            raise UsageError(f"--teacher-positions {item!r}: write HEAD=COLUMN, "
                             "e.g. a0.h3=pos_prev_label")
        positions[head] = column
    given = {k: v for k, v in vars(args).items() if v is not None}
    defaults = ExperimentConfig(task=args.task)
    base = defaults.distill
    if "steps" in given:
        base = distill.DistillConfig(steps=args.steps, batch_size=args.batch_size,
                                     kv_policy=args.kv_policy, eval_every=args.eval_every,
                                     cka_position=getattr(args, "cka_position", None))
    rule = {k: given[k] for k in ("k", "min_effect", "prefilter") if k in given}
    for arm_name in given.get("arms", []):
        arms.arm(arm_name)  # ValueError names the arm and the choices
    fields = {k: tuple(given[k]) if isinstance(given[k], list) else given[k]
              for k in ("seeds", "select_seed", "regimes", "val_items", "test_items",
                        "reference_items", "discovery_items", "n_random", "data_seed", "ood_items",
                        "lambdas", "matchers", "one_to_one", "arms")
              if k in given}
    if "arms" in fields:
        fields["arms"] = tuple(a.name for a in arms.ARMS if a.name in fields["arms"])
    return ExperimentConfig(
        task=args.task, task_kwargs=task_kwargs,
        ood=_ood(spec, bool(organism), {"n_boxes": getattr(args, "ood_boxes", None),
                                        "template": getattr(args, "ood_templates", None)}),
        lrs=tuple(given.get("lrs") or LRS[kind]),
        control_lr=given.get("control_lr", CONTROL_LR[kind]),
        teacher_positions=positions, distill=base,
        discovery=discovery.DiscoveryConfig(**rule),
        student_discovery=replace(defaults.student_discovery,
                                  method=given.get("student_method", "mean_ablation"), **rule),
        **fields,
    )


def context(args: argparse.Namespace, *, log=print):
    """The run folder's ``cdist.pipeline.Context`` for these flags, checked before anything is
    written; models load when a stage needs them."""
    from cdist.pipeline import Context, check_items

    set_threads(args.threads)
    try:
        cfg = experiment_config(args)
    except ValueError as e:
        raise UsageError(str(e)) from None
    dev = device(args)
    roles = [r for r in ("teacher", "student") if getattr(args, r, None)]
    loaders = {r: loader(getattr(args, r), dev) for r in roles}
    opened = {r: _opened(getattr(args, r)) for r in roles}
    toks = {r: o.tokenizer() for r, o in opened.items()}
    names = {r: getattr(args, r) for r in roles}
    if len(roles) == 2:
        check_tokenizers(opened, toks, (names["teacher"], names["student"]))
    ctx = Context(cfg, args.out, loaders, names, progress=True, log=log)
    # the items are made with the student's tokenizer (the teacher's when found alone)
    role = "student" if "student" in opened else "teacher"
    if toks[role] is None:
        raise UsageError(f"--{role} {getattr(args, role)} has no tokenizer files "
                         "(tokenizer.json); save the tokenizer beside the weights")
    try:
        check_items(cfg, toks[role], opened["teacher"].hf_config if "teacher" in opened else None)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return ctx
