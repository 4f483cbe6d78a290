"""The flags of the ``cdist`` pipeline's steps, in groups (models and output, items, circuits,
matching, training, the table's design), and the learning-rate grids by kind of student. A flag
that another command also takes (``cdist zoo circuits``) is defined once, in ``SHARED``.

Only the standard library and cdist's light modules (the task registry, the arms' names) are
imported here, so that ``--help`` answers at once.
"""

from __future__ import annotations

import argparse

from cdist import arms
from cdist.discovery_names import DISCOVERY_METHODS, METRICS, SEARCH_NAMES
from cdist.errors import ConfigError
from cdist.tasks.registry import TASKS

__all__ = ["CONTROL_LR", "LRS", "SHARED", "UsageError", "add_flags", "add_shared",
           "parse_min_effect", "parse_share"]

# Learning rates by kind of student. Zoo organisms: circuit CE needs about 1e-3 to move in a few
# hundred steps. Pretrained checkpoints: around the paper's 2e-5 (Llama-3, thousands of steps) and
# up, since a run here is hundreds of steps and trains a few heads' W_Q / W_O slices only.
LRS = {"zoo": (3e-4, 1e-3, 3e-3), "pretrained": (3e-5, 1e-4, 3e-4)}
CONTROL_LR = {"zoo": 3e-4, "pretrained": 3e-5}


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


def parse_share(text: str, *, zero: bool = True) -> float:
    """A command line's share (argparse type): a number in [0, 1], or (0, 1] with ``zero``
    off."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (0 <= value <= 1 and (zero or value > 0)):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number in {'[' if zero else '('}0, 1]")
    return value


def _parse_positive_share(text: str) -> float:
    """A share in (0, 1] (argparse type)."""
    return parse_share(text, zero=False)


def _parse_faithfulness(text: str) -> float:
    """``--min-faithfulness``: a number >= 0 (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number >= 0")
    return value


# Flags that more than one command takes, each defined once: name -> add_argument's keywords.
SHARED: dict[str, dict] = {
    "threads": dict(type=int, default=None, help="torch CPU threads"),
    "reference-items": dict(type=int, default=500,
                            help="items whose head means mean ablation writes"),
    "discovery-items": dict(type=int, default=200, help="items the circuits are found on"),
    "n-random": dict(type=int, default=5,
                     help="random circuits of the circuit's size per evaluation"),
    "k": dict(type=int, default=2, help="entity tracking: heads per path-patching group"),
    "min-effect": dict(type=parse_min_effect, default="noise",
                       help="entity tracking: a head's -relative change must exceed 2 standard "
                            "errors over the items (noise, the default) or this number"),
}


def task_name(name: str) -> str:
    """A registered task's name or a path to task data (checked without reading it)."""
    from cdist.tasks.from_file import is_task_file

    if name in TASKS or is_task_file(name):
        return name
    raise argparse.ArgumentTypeError(f"{name!r} is neither a task ({', '.join(sorted(TASKS))}) "
                                     "nor a .jsonl, .csv or datasets folder of items")


def add_shared(group, *names: str) -> None:
    """The ``SHARED`` flags ``names`` on ``group`` (a parser or an argument group)."""
    for name in names:
        group.add_argument(f"--{name}", **SHARED[name])


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
    g.add_argument("--task", default=default_task, type=task_name,
                   help=f"the task: one of {', '.join(sorted(TASKS))}, or a .jsonl or .csv file "
                        "or datasets folder of your own items (cdist/tasks/from_file.py) "
                        "(default: the run folder's, else entity_tracking)")
    g.add_argument("--out", default=None,
                   help="the run folder every step reads and writes (default: runs/<task>, "
                        "out of git)")
    g.add_argument("--config", default=None,
                   help="a TOML or YAML file of settings (flag names as keys); flags override it")
    g.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if present)")
    g.add_argument("--fingerprints", nargs="*", default=None, metavar="ROLE=HEX",
                   help="the weights each model must have, as its build recorded them "
                        "(cdist.store.model_fingerprint), e.g. teacher=3f2a...: another "
                        "checkpoint is refused")
    add_shared(g, "threads")
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
    add_shared(g, "reference-items", "discovery-items", "n-random")
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
    add_shared(g, "k", "min-effect")
    g.add_argument("--min-share", type=parse_share, default=0.01,
                   help="a head's effect must be at least this share of the largest effect it is "
                        "measured against (its scan's; in a path-patching search, the earlier "
                        "groups' too), 0 turns it off")
    g.add_argument("--min-faithfulness", type=_parse_faithfulness, default=0.8,
                   help="each circuit alone (every other head mean-ablated) must keep this share "
                        "of its model's accuracy on the validation items before anything trains; "
                        "0 turns the check off (a model at or below chance is refused otherwise)")
    g.add_argument("--grow-circuits", action=argparse.BooleanOptionalAction, default=True,
                   help="grow a circuit below --min-faithfulness (path-patching groups' next "
                        "heads, then heads by mean-ablation drop) instead of refusing it")
    g.add_argument("--grow-max-share", type=_parse_positive_share, default=0.25,
                   help="a grown circuit has at most this share of its model's heads")
    g.add_argument("--prefilter", type=int, default=None,
                   help="path-patching searches: scan exactly only the N senders per group "
                        "that path attribution ranks first (for deep models; default: every head)")
    g.add_argument("--search", choices=["auto", *SEARCH_NAMES], default="auto",
                   help="the path-patching search (auto: the task's; positions: the default "
                        "search built from the items' named positions)")
    g.add_argument("--metric", choices=["auto", *METRICS], default="auto",
                   help="what discovery scans read at the answer: the answer's probability, its "
                        "logit difference against a rival answer, or that normalised by the "
                        "clean-minus-corrupt gap (auto: the task's)")
    g.add_argument("--student-method", default="mean_ablation",
                   choices=["auto", *DISCOVERY_METHODS],
                   help="how the student's circuit is found (auto: as the teacher's, by task)")


def _matching_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("matching")
    g.add_argument("--matchers", nargs="+", choices=arms.SELECTABLE,
                   default=list(arms.SELECTABLE),
                   help="matchers made (cdist match) or tried (cdist table); '-1to1' assigns each "
                        "teacher head at most once (the homolog map is made whenever the "
                        "student's layer origin is known)")
    g.add_argument("--student-layer-origin", type=int, nargs="+", default=None, metavar="LAYER",
                   help="the teacher's layer each student layer was cut from (default: the "
                        "student checkpoint's record, if any)")
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
    g.add_argument("--arms", nargs="+", default=list(arms.DEFAULT_ARMS),
                   help="which arms (default: all but the homolog arm, which needs a student cut "
                        "from the teacher)")
    g.add_argument("--lrs", type=float, nargs="+", default=None,
                   help=f"learning rates tried for circuit CE (default: {LRS['zoo']} for zoo "
                        f"students, {LRS['pretrained']} for checkpoints; the paper: 2e-5 for "
                        "Llama-3)")
    g.add_argument("--lambdas", type=float, nargs="+", default=[0.1, 0.3, 1.0, 3.0, 10.0],
                   help="CKA weights tried")
    g.add_argument("--margin", type=float, default=0.02,
                   help="equivalence margin of the comparisons (accuracy, both ways)")
