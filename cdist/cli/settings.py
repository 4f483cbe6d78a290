"""A pipeline step's settings: where they come from, the typed record they make, and the run
folder's memory of them.

A run folder (``--out``) is where each step leaves what the next one reads (circuits, scans, head
maps, trained runs; ``cdist.pipeline``), and ``config.yaml`` there keeps the settings its steps
used. A step's settings come from, lowest first: the flags' defaults, the run folder's
``config.yaml``, a ``--config`` file (TOML or YAML), and the flags given. ``out`` and ``config``
are the command line's alone (they say which files are read): a config file that sets them is
refused. So ``cdist discover
--val-items 100 --out R`` followed by ``cdist match --out R`` matches on the same items, and
``cdist table --config R/config.yaml --out R2`` re-makes a run from its record. The result is a
``RunSettings``: every flag of every step, None where the step takes no such flag (the
experiment's own default then holds).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

from cdist import run_folder, tasks
from cdist.cli.flags import UsageError
from cdist.cli.parser import Parser
from cdist.tasks.registry import TASKS

__all__ = ["RUN_CONFIG", "RunSettings", "announce", "keep_settings", "parse", "read_settings"]

RUN_CONFIG = "config.yaml"
# Settings of the machine, of one invocation or of one training run, which a run folder does not
# hand on to its next step (a second `cdist distill` there is another run, not the same again).
_NOT_KEPT = {"command", "config", "out", "device", "threads", "figures", "draw_only", "roles",
             "arm", "matcher", "lr", "lam", "seed", "train_items"}

# Settings read before any file is (they say which files to read): a config file cannot set them
_ON_THE_LINE = {"out", "config"}


@dataclass(frozen=True)
class RunSettings:
    """One step's resolved settings (module doc); lists are tuples."""

    command: str
    task: str
    out: str
    argv: tuple[str, ...] = ()
    named_roles: tuple[str, ...] = ()  # the models named on the command line itself
    # the run folder's kept settings this step took (not given, not the default), as flags
    from_folder: tuple[str, ...] = ()
    # models and output
    teacher: str | None = None
    student: str | None = None
    config: str | None = None
    device: str | None = None
    threads: int | None = None
    fingerprints: tuple[str, ...] | None = None
    # items
    val_items: int | None = None
    test_items: int | None = None
    ood_items: int | None = None
    reference_items: int | None = None
    discovery_items: int | None = None
    n_random: int | None = None
    data_seed: int | None = None
    template: str | None = None
    n_boxes: int | None = None
    objects: tuple[str, ...] | None = None
    labels: tuple[str, ...] | None = None
    characters: tuple[str, ...] | None = None
    containers: tuple[str, ...] | None = None
    states: tuple[str, ...] | None = None
    names: tuple[str, ...] | None = None
    places: tuple[str, ...] | None = None
    gifts: tuple[str, ...] | None = None
    ood_boxes: tuple[int, ...] | None = None
    ood_templates: tuple[str, ...] | None = None
    # circuits
    k: int | None = None
    min_effect: float | str | None = None
    prefilter: int | None = None
    search: str | None = None
    metric: str | None = None
    student_method: str | None = None
    min_share: float | None = None
    min_faithfulness: float | None = None
    grow_circuits: bool | None = None
    grow_max_share: float | None = None
    roles: tuple[str, ...] | None = None
    # matching
    matchers: tuple[str, ...] | None = None
    student_layer_origin: tuple[int, ...] | None = None
    cka_position: str | None = None
    teacher_positions: tuple[str, ...] | None = None
    # training
    steps: int | None = None
    eval_every: int | None = None
    batch_size: int | None = None
    kv_policy: str | None = None
    control_lr: float | None = None
    # one run (cdist distill)
    arm: str | None = None
    matcher: str | None = None
    lr: float | None = None
    lam: float | None = None
    seed: int | None = None
    train_items: int | None = None
    # the table's design
    seeds: tuple[int, ...] | None = None
    select_seed: int | None = None
    regimes: tuple[int, ...] | None = None
    arms: tuple[str, ...] | None = None
    lrs: tuple[float, ...] | None = None
    lambdas: tuple[float, ...] | None = None
    margin: float | None = None
    figures: str | None = None
    draw_only: bool | None = None

    def model(self, role: str) -> str | None:
        return self.teacher if role == "teacher" else self.student

    def words(self) -> dict[str, list[str]]:
        """The word lists given (task role -> words)."""
        roles = {r for spec in TASKS.values() for r in spec.word_lists}
        return {r: list(getattr(self, r)) for r in sorted(roles) if getattr(self, r) is not None}


def _plain(value):
    """A setting as YAML writes it plainly (tuples as lists)."""
    return list(value) if isinstance(value, tuple) else value


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
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    # a setting of earlier run folders: one-to-one assignment is now a matcher of its own
    if data.pop("one_to_one", False) is not False:
        raise UsageError(f"config file {path}: one_to_one is no longer a setting; name the "
                         "one-to-one matchers instead, e.g. matchers: [ablation-1to1, cka-1to1]")
    return data


def _flags(parser: Parser, key: str, value, where: str) -> list[str]:
    """One setting as the flags that would set it (none for None)."""
    action = parser.flags.get(key)
    if action is None:
        raise UsageError(f"{where}: unknown setting {key!r} for this command; known: "
                         f"{', '.join(sorted(parser.flags))}")
    if value is None:
        return []
    option = action.option_strings[0]
    both_ways = isinstance(action, argparse.BooleanOptionalAction)
    store_true = not both_ways and action.nargs == 0 and action.const is True
    if action.nargs == 0 and not (both_ways or store_true):
        raise UsageError(f"{where}: {key} cannot be set from a file; give --{key} on the "
                         "command line")
    if (both_ways or store_true) and not isinstance(value, bool):  # YAML's "false" is text
        raise UsageError(f"{where}: {key} = {value!r}; write true or false")
    if both_ways:
        return [option if value else "--no-" + option.removeprefix("--")]
    if store_true:
        return [option] if value else []
    if action.nargs in ("+", "*"):
        return [option, *map(str, value if isinstance(value, list) else [value])]
    return [option, str(value)]


def _argv(parser: Parser, settings: dict, where: str) -> list[str]:
    """``settings`` as the flags that would set them, so that argparse checks their types."""
    argv = [flag for key, value in settings.items() for flag in _flags(parser, key, value, where)]
    # argparse checks the values' types and choices here, so that an error names the file
    parser.exit_on_error = False
    try:
        parser.parse_args(argv)
    except argparse.ArgumentError as e:
        raise UsageError(f"{where}: {e}") from None
    finally:
        parser.exit_on_error = True
    return argv


def parse(parser: Parser, argv: list[str], command: str) -> RunSettings:
    """``argv`` parsed over the run folder's settings and the ``--config`` file's (module doc)."""
    first = parser.parse_args(argv)
    spec = tasks.get_task(first.task or "entity_tracking")
    # runs/ is out of git: a step without --out never writes beside the committed results/
    out = Path(first.out or f"runs/{spec.name}")
    layers, kept, given = [], {}, {}
    saved = out / RUN_CONFIG
    # a config.yaml of the user's own is not cdist's record (a step that writes refuses the
    # folder when it claims it, cdist.run_folder)
    if saved.is_file() and run_folder.made_by_cdist(out):
        kept = {k: v for k, v in read_settings(saved).items() if k in parser.flags}
        layers.append(_argv(parser, kept, str(saved)))
    if first.config:
        # a run folder's config.yaml holds every step's settings: another step's are left to it,
        # so that the file re-makes any of its steps; a key no step takes is refused
        others = {f.name for f in fields(RunSettings)} - set(parser.flags)
        given = {k: v for k, v in read_settings(Path(first.config)).items() if k not in others}
        for key in sorted(set(given) & _ON_THE_LINE):
            raise UsageError(f"config file {first.config} sets {key}, which only the command line "
                             f"names; remove it and give --{key} on the command line")
        layers.append(_argv(parser, given, first.config))
    on_line = _given(parser, argv)
    carried = {k: v for k, v in kept.items()
               if k not in on_line and k not in given and k not in _NOT_KEPT and v is not None
               and _plain(parser.flags[k].default) != v}
    args = parser.parse_args([*(flag for layer in layers for flag in layer), *argv])
    values = {k: v for k, v in vars(args).items() if k in parser.flags}
    values["task"] = values["task"] or "entity_tracking"
    values["out"] = str(out)
    for role in ("teacher", "student"):
        if role in values and values[role] is None:
            pair = tasks.get_task(values["task"]).default_models
            if pair is None:
                raise UsageError(f"--{role}: {values['task']} has no zoo pair; name a zoo model, "
                                 "checkpoint directory or .gguf file")
            values[role] = pair[role == "student"]
    named = tuple(r for r in ("teacher", "student") if getattr(first, r, None))
    return RunSettings(command=command, argv=tuple(argv), named_roles=named,
                       from_folder=tuple(" ".join(_flags(parser, k, v, str(saved)))
                                         for k, v in sorted(carried.items())),
                       **{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def _given(parser: Parser, argv: list[str]) -> set[str]:
    """The settings ``argv`` names itself (``--flag value``, ``--flag=value``, ``--no-flag``)."""
    options = {o: dest for dest, a in parser.flags.items() for o in a.option_strings}
    # argparse also takes an unambiguous prefix of a long flag
    named = set()
    for token in argv:
        word = token.split("=", 1)[0]
        if not word.startswith("--"):
            continue
        hits = {dest for o, dest in options.items() if o == word} or \
            {dest for o, dest in options.items() if o.startswith(word)}
        if len(hits) == 1:
            named |= hits
    return named


def announce(args: RunSettings) -> None:
    """Say which settings this step took from the run folder rather than from its command line
    (on stderr, so that a step's printed results stay clean), so that a flag left out is not
    mistaken for its default."""
    if args.from_folder:
        given = f"; given: {shlex.join(args.argv)}" if args.argv else ""
        print(f"cdist {args.command}: settings kept in {Path(args.out) / RUN_CONFIG}: "
              f"{' '.join(args.from_folder)}{given} (a flag given replaces a kept one; "
              "settings that fix the folder's items or circuits need a new --out)",
              file=sys.stderr, flush=True)


def keep_settings(parser: Parser, args: RunSettings) -> None:
    """Write the run folder's ``config.yaml`` (its settings merged with this step's) and append the
    command to its ``commands.log``, before the step does any work."""
    import yaml

    from cdist.checkpoints import atomic_write_text, is_follower, writing
    from cdist.provenance import git_commit

    if is_follower():  # under torchrun rank 0 keeps the folder's records
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    saved = out / RUN_CONFIG
    settings = read_settings(saved) if saved.is_file() else {}
    settings |= {k: _plain(getattr(args, k)) for k in parser.flags if k not in _NOT_KEPT}
    settings["task"] = args.task
    commit = git_commit()
    header = (f"# cdist run folder settings, last written by `cdist {args.command}` at commit "
              f"{commit}, {time.strftime('%Y-%m-%d %H:%M:%S')}.\n# Re-make a step: cdist "
              f"{args.command} --config {saved} --out NEW_FOLDER\n")
    atomic_write_text(header + yaml.safe_dump(settings, sort_keys=True), saved)
    with writing(out / "commands.log"), open(out / "commands.log", "a") as log:
        log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {commit} "
                  f"{shlex.join(['cdist', args.command, *args.argv])}\n")
