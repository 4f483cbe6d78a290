"""The arms of the circuit-distillation experiment (Wadhwa et al.'s Table 1 rows, plus controls):
one record per row of the table, from which the CLI takes its choices and ``cdist.pipeline`` builds
each run's ``DistillConfig``; the comparisons the table tests between them; the names of the head
matchers (``cdist.pipeline.head_maps`` makes their maps).

Every trained arm starts from the same base student, once per seed and training regime; the seed
sets the data order, the shuffled control's permutations and the random control's teacher heads.
Circuit arms train only the student circuit's heads (``kv_policy`` of the experiment, "qo" by
default: nothing else changes function). The head map of every circuit arm is passed to training, so
its pairs' CKA is monitored even where it is not in the loss.

The two controls keep the aligned arm's gradient scale and change one thing each:
- ``CE + Shuffled CKA``: the aligned pairs, the teacher's rows permuted within each batch (no item
  correspondence);
- ``CE + Rand CKA``: the aligned map's shape (as many pairs, one to one where it is), each aligned
  teacher head replaced by one drawn from outside the whole teacher circuit, each pair keeping its
  student head and positions (``matching.random_control``).

``CE + Align CKA (homolog)`` aligns each student circuit head with its homolog, the teacher head it
descends from (``cdist.homologs``), where the student was cut from the teacher's own base model.

The positive control asks whether alignment alone carries task signal: Align CKA only at a small
learning rate (``ExperimentConfig.control_lr``), correctly paired against shuffled.

The "(strong)" pair repeats CE + Align CKA and CE + Shuffled CKA at the smallest lambda of the grid
whose CKA:CE gradient ratio at the start reaches ``STRONG_RATIO`` (0.3): where validation picks a
lambda at which the alignment barely pulls, this pair still asks whether the item pairing matters
when it does.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

from cdist.errors import InputError

if TYPE_CHECKING:  # the command line reads the arms' names without importing torch
    from cdist.distill import DistillConfig

__all__ = ["ARMS", "COMPARISONS", "DEFAULT_ARMS", "MATCHERS", "MATCHER_RECORDS", "PRIMARY",
           "SELECTABLE", "STRONG_RATIO", "Arm", "Comparison", "Matcher", "arm", "matcher"]


@dataclass(frozen=True)
class Arm:
    """One row: how the student is trained, if at all.

    Attributes:
        name: the row's label.
        trained: False for the base student and the teacher.
        trainable: "heads" (the student circuit) or "all" (fully distilled).
        ce_weight, kd_weight: loss weights (``DistillConfig``).
        cka: None, "align", "shuffled" or "random": which head map the CKA term uses, weighted by
            lambda.
        control_lr: train at the positive control's small learning rate instead of the table's.
        strong: train at the strong lambda (module doc) instead of the selected one.
        model: whose model the row is (the teacher's row is the teacher, evaluated as it is).
        head_map: "selected" (the map selection chose) or "homolog" (``cdist.homologs``).
    """

    name: str
    trained: bool = True
    trainable: Literal["heads", "all"] = "heads"
    ce_weight: float = 1.0
    kd_weight: float = 0.0
    cka: Literal["align", "shuffled", "random"] | None = None
    control_lr: bool = False
    strong: bool = False
    model: Literal["student", "teacher"] = "student"
    head_map: Literal["selected", "homolog"] = "selected"

    def __post_init__(self) -> None:
        if (self.trainable not in ("heads", "all")
                or self.cka not in (None, "align", "shuffled", "random")
                or self.model not in ("student", "teacher")
                or self.head_map not in ("selected", "homolog")):
            raise InputError(f"arm {self.name!r}: trainable {self.trainable!r} (heads or all), "
                             f"cka {self.cka!r} (None, align, shuffled or random), model "
                             f"{self.model!r} (student or teacher), head_map {self.head_map!r} "
                             "(selected or homolog)")

    def config(self, base: DistillConfig, *, lam: float, lr: float, control_lr: float,
               seed: int) -> DistillConfig:
        """This arm's run of ``base`` at lambda ``lam`` and the table's ``lr``."""
        if not self.trained:
            raise InputError(f"{self.name!r} is not trained")
        return replace(base, trainable=self.trainable, ce_weight=self.ce_weight,
                       kd_weight=self.kd_weight, cka_weight=lam if self.cka else 0.0,
                       shuffle_teacher=self.cka == "shuffled",
                       lr=control_lr if self.control_lr else lr, seed=seed)


ARMS: tuple[Arm, ...] = (
    Arm("base student", trained=False),
    Arm("teacher", trained=False, model="teacher"),
    Arm("fully distilled, CE", trainable="all"),
    Arm("circuit distilled, CE"),
    Arm("circuit distilled, KD", ce_weight=0.0, kd_weight=1.0),
    Arm("circuit distilled, CE + Align CKA", cka="align"),
    Arm("circuit distilled, CE + Align CKA (homolog)", cka="align", head_map="homolog"),
    Arm("circuit distilled, CE + Shuffled CKA", cka="shuffled"),
    Arm("circuit distilled, CE + Rand CKA", cka="random"),
    Arm("circuit distilled, Align CKA", ce_weight=0.0, cka="align"),
    Arm("circuit distilled, CE + Align CKA (strong)", cka="align", strong=True),
    Arm("circuit distilled, CE + Shuffled CKA (strong)", cka="shuffled", strong=True),
    Arm("positive control, Align CKA (small lr)", ce_weight=0.0, cka="align", control_lr=True),
    Arm("positive control, Shuffled CKA (small lr)", ce_weight=0.0, cka="shuffled",
        control_lr=True),
)

ALIGN, CE = "circuit distilled, CE + Align CKA", "circuit distilled, CE"


@dataclass(frozen=True)
class Comparison:
    """Arm ``a`` against arm ``b``, and how the table reads it.

    ``role``: "primary" (declared before the runs: the one comparison the table is designed to
    decide, on the test items), "secondary" (a family, Holm-corrected together with the primary's
    OOD sets) or "check" (reported uncorrected: whether a control behaves as a control should).
    """

    a: str
    b: str
    role: Literal["primary", "secondary", "check"]


# a table's arms unless told: every arm that any pair of models can have (the homolog arm needs a
# student cut from the teacher, so it is asked for by name)
DEFAULT_ARMS: tuple[str, ...] = tuple(a.name for a in ARMS if a.head_map != "homolog")

# The question of circuit distillation (Wadhwa et al.: CE + Align CKA beats circuit CE alone), the
# primary first: the mean over seeds of the per-seed difference in test accuracy, with its interval
# and an equivalence test at the experiment's margin (cdist.stats).
COMPARISONS: tuple[Comparison, ...] = (
    Comparison(ALIGN, CE, "primary"),
    Comparison("circuit distilled, CE + Align CKA (homolog)", CE, "secondary"),
    Comparison(ALIGN, "circuit distilled, CE + Shuffled CKA", "secondary"),
    Comparison(ALIGN, "circuit distilled, CE + Rand CKA", "secondary"),
    Comparison(ALIGN, "circuit distilled, KD", "check"),
    Comparison("circuit distilled, CE + Align CKA (strong)",
               "circuit distilled, CE + Shuffled CKA (strong)", "check"),
    Comparison("circuit distilled, CE + Align CKA (strong)", CE, "check"),
    Comparison("positive control, Align CKA (small lr)",
               "positive control, Shuffled CKA (small lr)", "check"),
)
PRIMARY = (COMPARISONS[0].a, COMPARISONS[0].b)
STRONG_RATIO = 0.3


@dataclass(frozen=True)
class Matcher:
    """One way to pair each student circuit head with teacher heads; a table chooses among them on
    validation items (``cdist.pipeline.head_maps`` makes each one's map).

    Attributes:
        name: how the command line and the results name it.
        method: "ablation" (the heads whose mean-ablation drops are closest; Wadhwa et al.),
            "cka" (the heads whose activations are most similar; Kornblith et al. 2019) or
            "homolog" (each student head's homolog, ``cdist.homologs``: a ground truth where the
            student was cut from the teacher, not a candidate for selection).
        normalise: for "ablation", None (the paper's rule: both drops against the student's
            baseline) or "baseline" (each drop against its own model's baseline).
        one_to_one: each teacher head paired at most once (Hungarian assignment) instead of each
            student head to its nearest teacher head.
    """

    name: str
    method: Literal["ablation", "cka", "homolog"]
    normalise: Literal["baseline"] | None = None
    one_to_one: bool = False

    def __post_init__(self) -> None:
        if (self.method not in ("ablation", "cka", "homolog")
                or self.normalise not in (None, "baseline")):
            raise InputError(f"matcher {self.name!r}: method {self.method!r} (ablation, cka or "
                             f"homolog), normalise {self.normalise!r} (None or baseline)")


MATCHER_RECORDS: tuple[Matcher, ...] = (
    Matcher("ablation", "ablation"),
    Matcher("ablation-baseline", "ablation", normalise="baseline"),
    Matcher("cka", "cka"),
    Matcher("ablation-1to1", "ablation", one_to_one=True),
    Matcher("ablation-baseline-1to1", "ablation", normalise="baseline", one_to_one=True),
    Matcher("cka-1to1", "cka", one_to_one=True),
    Matcher("homolog", "homolog", one_to_one=True),
)
MATCHERS: tuple[str, ...] = tuple(m.name for m in MATCHER_RECORDS)
# what table selection tries by default: every learned rule, many to one and one to one
SELECTABLE: tuple[str, ...] = tuple(m.name for m in MATCHER_RECORDS if m.method != "homolog")


def matcher(name: str) -> Matcher:
    """The matcher called ``name``."""
    for m in MATCHER_RECORDS:
        if m.name == name:
            return m
    raise InputError(f"unknown matcher {name!r}; choose from {list(MATCHERS)}")


def arm(name: str) -> Arm:
    """The arm called ``name``."""
    for a in ARMS:
        if a.name == name:
            return a
    raise InputError(f"unknown arm {name!r}; choose from {[a.name for a in ARMS]}")
