"""What the ``cdist`` pipeline's steps share once their settings are read: the device, model
loading, the tokenizer check between teacher and student, the ``ExperimentConfig`` the settings
describe, and the run's ``cdist.pipeline.Context``. Heavy libraries are imported when a step runs,
not when the command line is built, so that ``--help`` answers at once.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

from cdist import arms, tasks
from cdist.cli.flags import CONTROL_LR, LRS, UsageError
from cdist.cli.settings import RunSettings

__all__ = ["context", "device", "experiment_config", "loader", "organism_kwargs", "pick_device",
           "set_threads"]

# The kinds of OOD set that --ood-boxes and --ood-templates name: generator keyword -> label.
_OOD_LABELS = {"n_boxes": "{} boxes", "template": "template {}"}


def device(args: RunSettings) -> str:
    """``--device`` (``pick_device``)."""
    return pick_device(args.device)


def pick_device(chosen: str | None) -> str:
    """The device named, checked to exist, or cuda when present; under ``torchrun`` this rank's
    GPU (``cdist.distributed``)."""
    import torch

    from cdist import distributed
    from cdist.errors import InputError
    from cdist.models import check_device

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


def shadowed(source: str) -> bool:
    """Whether ``source`` names a zoo model and also a file or folder here: the zoo model is taken
    (as in every run folder's record, whichever folder a step runs from); ``./NAME`` takes the
    local one."""
    from cdist import zoo

    return source in zoo.names() and Path(source).exists()


def loader(source: str, dev: str):
    """A function that loads ``source`` (a zoo name, checkpoint directory or .gguf file; a zoo
    name first, ``shadowed``)."""
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
    """``--threads``: torch's CPU threads (at most this process's cores, ``cdist.limits``), or
    torch's default when not given."""
    from cdist import limits

    try:
        limits.check_threads(threads)
    except ValueError as e:
        raise UsageError(str(e)) from None
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


def _check_kind(task: str, spec, flag: str, kind: str, values) -> None:
    """Refuse ``values`` of a generator setting (``template``, ``n_boxes``) the task lacks."""
    if kind == "template":
        unknown = [v for v in values if v not in spec.templates]
        if unknown:
            raise UsageError(f"{flag} {' '.join(unknown)}: {task} has templates "
                             f"{sorted(spec.templates)}")
    elif "n_boxes" not in inspect.signature(spec.generate).parameters:
        raise UsageError(f"{flag}: {task} has no boxes")


def _ood(task: str, spec, organism: bool, given: dict) -> tuple[tuple[str, dict], ...]:
    """The task's default out-of-distribution sets, each kind (``n_boxes``, ``template``) replaced
    by the values ``given`` for it (a flag's values; None keeps the defaults; an empty list, none
    of that kind), kinds in the defaults' order, then the others given (a task with no default
    OOD sets, such as IOI, takes ``--ood-templates`` too: they were ignored)."""
    defaults = spec.default_ood(organism)
    for kind, values in given.items():
        if values:
            _check_kind(task, spec, "--ood-" + ("boxes" if kind == "n_boxes" else "templates"),
                        kind, values)
    kinds = dict.fromkeys([key for _, overrides in defaults for key in overrides]
                          + [kind for kind, values in given.items() if values is not None])
    ood = []
    for kind in kinds:
        if given.get(kind) is None:
            ood += [s for s in defaults if kind in s[1]]
        else:
            ood += [(_OOD_LABELS[kind].format(v), {kind: v}) for v in given[kind]]
    return tuple(ood)


def _organism(s: RunSettings) -> dict | None:
    """The zoo student's (else teacher's) training config, refusing a zoo model of another
    task."""
    from cdist import zoo
    from cdist.errors import MismatchError

    own_data = tasks.get_task(s.task).size is not None  # a task file: the user's items decide
    for role in ("teacher", "student"):
        name = s.model(role)
        trained_on = zoo.manifest(name)["config"]["task"] if name in zoo.names() else None
        if trained_on not in (None, s.task) and not own_data:
            raise MismatchError(f"--{role} {name} was trained on {trained_on}, not {s.task}; "
                                f"pass --task {trained_on} or a {s.task} model")
    student = s.student or s.teacher
    return zoo.manifest(student)["config"] if student in zoo.names() else None


def organism_kwargs(spec, organism: dict) -> dict:
    """The generator's settings of a zoo organism's own items (its template, boxes, words), from
    its manifest's config."""
    kwargs = {"template": organism["template"], **organism.get("task_kwargs", {})}
    return kwargs | {k: organism[k] for k in spec.organism_kwargs}


def _task_kwargs(s: RunSettings, spec, organism: dict | None) -> dict:
    """The generator's settings: a zoo student's own items (its template, boxes, words), else the
    task's real template; then the flags' template, box count and word lists."""
    if spec.size is not None:  # a task file's items are its rows
        kwargs = {}
    elif organism:
        kwargs = organism_kwargs(spec, organism)
    else:
        kwargs = {"template": spec.real_template}
    if s.template is not None:
        _check_kind(s.task, spec, "--template", "template", [s.template])
        kwargs["template"] = s.template
    if s.n_boxes is not None:
        _check_kind(s.task, spec, "--n-boxes", "n_boxes", [s.n_boxes])
        kwargs["n_boxes"] = s.n_boxes
    for role, words in s.words().items():
        if role not in spec.word_lists:
            raise UsageError(f"--{role.replace('_', '-')}: {s.task} has no {role}; its "
                             f"word lists are {sorted(spec.word_lists)}")
        kwargs[role] = words
    return kwargs


def _pairs(items, flag: str, form: str, example: str) -> dict[str, str]:
    """``KEY=VALUE`` words as a dict (the keys and values are checked by ExperimentConfig)."""
    pairs = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"{flag} {item!r}: write {form}, e.g. {example}")
        if key in pairs:
            raise UsageError(f"{flag} names {key} twice; give each once")
        pairs[key] = value
    return pairs


# ExperimentConfig fields that a flag of the same name sets, where the step takes it
_DESIGN = ("seeds", "select_seed", "regimes", "val_items", "test_items", "reference_items",
           "discovery_items", "n_random", "data_seed", "ood_items", "lambdas", "matchers",
           "margin", "student_layer_origin", "min_faithfulness", "grow_circuits",
           "grow_max_share")


def experiment_config(s: RunSettings):
    """The ``ExperimentConfig`` the settings describe (settings a step does not take keep the
    config's defaults, so its steps make the same items as a table would)."""
    from dataclasses import replace

    from cdist import discovery, distill
    from cdist.pipeline.config import ExperimentConfig

    spec, organism = tasks.get_task(s.task), _organism(s)
    kind = "zoo" if organism else "pretrained"
    defaults = ExperimentConfig(task=s.task)
    base = defaults.distill
    if s.steps is not None:
        base = distill.DistillConfig(steps=s.steps, batch_size=s.batch_size,
                                     kv_policy=s.kv_policy, eval_every=s.eval_every,
                                     cka_position=s.cka_position)
    rule = {k: getattr(s, k) for k in ("k", "min_effect", "prefilter", "min_share", "metric")
            if getattr(s, k) is not None}
    search = {"search": s.search} if s.search is not None else {}
    fields = {k: getattr(s, k) for k in _DESIGN if getattr(s, k) is not None}
    if s.arms is not None:
        for arm_name in s.arms:
            arms.arm(arm_name)  # names the arm and the choices
        if len(set(s.arms)) != len(s.arms):
            raise UsageError(f"--arms {' '.join(map(repr, s.arms))} repeats an arm; give each once")
        fields["arms"] = tuple(a.name for a in arms.ARMS if a.name in s.arms)
    return ExperimentConfig(
        task=s.task, task_kwargs=_task_kwargs(s, spec, organism),
        ood=_ood(s.task, spec, bool(organism),
                 {"n_boxes": s.ood_boxes, "template": s.ood_templates}),
        lrs=tuple(s.lrs or LRS[kind]),
        control_lr=s.control_lr if s.control_lr is not None else CONTROL_LR[kind],
        teacher_positions=_pairs(s.teacher_positions, "--teacher-positions",
                                 "HEAD=COLUMN", "a0.h3=pos_prev_label"), distill=base,
        fingerprints=_pairs(s.fingerprints, "--fingerprints", "ROLE=HEX", "teacher=3f2a..."),
        discovery=discovery.DiscoveryConfig(**rule, **search),
        student_discovery=replace(defaults.student_discovery,
                                  method=s.student_method or "mean_ablation", **rule),
        **fields,
    )


def context(s: RunSettings, *, log=None):
    """The run folder's ``cdist.pipeline.Context`` for these settings, checked before anything is
    written; models load when a stage needs them."""
    from cdist.models import hooked_config_from_hf
    from cdist.pipeline import Context, check_items

    set_threads(s.threads)
    try:
        cfg = experiment_config(s)
    except ValueError as e:
        raise UsageError(str(e)) from None
    dev = device(s)
    names = {r: s.model(r) for r in ("teacher", "student") if s.model(r)}
    for role, name in names.items():
        if shadowed(name):
            print(f"cdist {s.command}: --{role} {name} is a zoo model and also a path here; "
                  f"taking the zoo model (write ./{name} for the path)", file=sys.stderr,
                  flush=True)
    # one model named as both teacher and student gets one loader, so the Context loads it once
    by_name = {name: loader(name, dev) for name in dict.fromkeys(names.values())}
    loaders = {r: by_name[name] for r, name in names.items()}
    opened = {r: _opened(name) for r, name in names.items()}
    toks = {r: o.tokenizer() for r, o in opened.items()}
    if len(names) == 2:
        check_tokenizers(opened, toks, (names["teacher"], names["student"]))
    ctx = Context(cfg, s.out, loaders, names, progress=True, **({"log": log} if log else {}))
    # the items are made with the student's tokenizer (the teacher's when found alone)
    role = "student" if "student" in opened else "teacher"
    if toks[role] is None:
        raise UsageError(f"--{role} {names[role]} has no tokenizer files "
                         "(tokenizer.json); save the tokenizer beside the weights")
    contexts = {f"the {r} {names[r]}": hooked_config_from_hf(o.hf_config).n_ctx
                for r, o in opened.items()}
    try:
        check_items(cfg, toks[role], opened["teacher"].hf_config if "teacher" in opened else None,
                    contexts, models={r: o.hf_config for r, o in opened.items()}, device=dev)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return ctx
