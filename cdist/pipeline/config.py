"""What defines one experiment (one table): the task and its item sets, the design (seeds,
regimes, arms), the grids that selection searches, and the rules that find circuits and train runs.
It is written next to the table's results, and ``cdist table --config`` re-makes a table from it.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field, replace
from typing import Literal

from cdist import arms, limits, tasks
from cdist.discovery import DiscoveryConfig
from cdist.distill import DistillConfig
from cdist.errors import ConfigError
from cdist.types import Head

__all__ = ["ROLES", "ExperimentConfig", "Role"]

Role = Literal["teacher", "student"]
ROLES: tuple[Role, Role] = ("teacher", "student")


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything that defines one table (written next to its results)."""

    task: str  # a registered task (cdist.tasks.get_task)
    task_kwargs: dict = field(default_factory=dict)  # template, n_boxes, ... for the generator
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    # hyperparameter selection: data order and random maps, never a table seed
    select_seed: int = 100
    regimes: tuple[int, ...] = (128, 2000)  # training items; the first is the primary regime
    data_seed: int = 0
    val_items: int = 500
    test_items: int = 1000
    reference_items: int = 500
    discovery_items: int = 200
    # (name, generator overrides), e.g. ("10 boxes", {"n_boxes": 10})
    ood: tuple[tuple[str, dict], ...] = ()
    ood_items: int = 500
    min_teacher_ood: float = 0.9  # an OOD set where the teacher is below this is flagged, not read
    lrs: tuple[float, ...] = (3e-4, 1e-3, 3e-3)
    lambdas: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0, 10.0)
    matchers: tuple[str, ...] = arms.SELECTABLE
    control_lr: float = 3e-4
    # teacher head name -> position column (user-named)
    teacher_positions: dict = field(default_factory=dict)
    distill: DistillConfig = DistillConfig(steps=600, eval_every=25)
    discovery: DiscoveryConfig = DiscoveryConfig()
    student_discovery: DiscoveryConfig = DiscoveryConfig(method="mean_ablation")
    n_random: int = 5
    arms: tuple[str, ...] = arms.DEFAULT_ARMS
    # the equivalence margin of every comparison (accuracy, both ways), declared with the primary
    margin: float = 0.02
    alpha: float = 0.05
    # the student's layers' numbers in the teacher, where it was cut from the teacher's base model
    # and its checkpoint does not say so (models.keep_layers records it); () = the checkpoint's
    student_layer_origin: tuple[int, ...] = ()
    # role -> the weights' fingerprint (cdist.store.model_fingerprint) a model must have, as its
    # build recorded it (experiments/smollm2_models.py): a rebuilt checkpoint is refused
    fingerprints: dict = field(default_factory=dict)
    # Stage 1's faithfulness check (cdist.pipeline.circuits): each circuit alone (every other head
    # mean-ablated) must keep this share of its model's accuracy on the validation items; 0 turns
    # the check off. A model at or below chance there is refused whatever the circuit.
    min_faithfulness: float = 0.8
    # below min_faithfulness: grow the circuit (the path-patching groups' runners-up, then heads by
    # their mean-ablation drop on the validation items) until it holds; False: refuse at once
    grow_circuits: bool = True
    grow_max_share: float = 0.25  # growth stops at this share of the model's heads, and refuses

    def __post_init__(self) -> None:
        spec = tasks.get_task(self.task)  # UnknownTaskError lists the registered tasks
        takes = set(inspect.signature(spec.generate).parameters) - {"n", "tokenizer", "seed",
                                                                    "split"}
        for kwargs in (self.task_kwargs, *(kw for _, kw in self.ood)):
            if set(kwargs) - takes:
                raise ConfigError(f"{self.task} items take no {sorted(set(kwargs) - takes)}; "
                                  f"their settings are {sorted(takes)}")
        for name in self.arms:
            arms.arm(name)
        unknown = sorted(set(self.matchers) - set(arms.SELECTABLE))
        if unknown or not self.matchers:
            raise ConfigError(f"matchers {unknown or '(none)'}; choose from "
                              f"{list(arms.SELECTABLE)} (the homolog map is an arm of its own)")
        if not 0 < self.margin < 1 or not 0 < self.alpha < 1:
            raise ConfigError(f"margin {self.margin} and alpha {self.alpha}: each must be "
                              "between 0 and 1")
        if not self.seeds or not self.regimes or not self.lrs or not self.lambdas:
            raise ConfigError("seeds, regimes, lrs and lambdas each need at least one value")
        for name in ("seeds", "regimes"):
            values = getattr(self, name)
            if any(isinstance(v, bool) or not isinstance(v, int) for v in values):
                raise ConfigError(f"{name}={values}: give whole numbers")
        # a list value given twice would run, or test, the same thing twice
        for name, values in (("seeds", self.seeds), ("regimes", self.regimes), ("lrs", self.lrs),
                             ("lambdas", self.lambdas), ("matchers", self.matchers),
                             ("arms", self.arms), ("ood", [label for label, _ in self.ood])):
            if len(set(values)) != len(values):
                raise ConfigError(f"{name}={tuple(values)} repeats a value; give each once")
        for name, value in (("data_seed", self.data_seed), ("select_seed", self.select_seed),
                            *(("seeds", seed) for seed in self.seeds)):
            limits.check_seed(name, value)
        if not all(math.isfinite(x) for x in (*self.lrs, *self.lambdas, self.control_lr)):
            raise ConfigError(f"lrs {self.lrs}, lambdas {self.lambdas}, control_lr "
                              f"{self.control_lr}: each must be a finite number")
        if self.select_seed in self.seeds:
            raise ConfigError(f"select_seed {self.select_seed} is a table seed; "
                              f"choose one outside {self.seeds}")
        for name in ("val_items", "test_items", "reference_items", "discovery_items", "ood_items",
                     "n_random"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}; it must be at least 1")
        if self.val_items < 4:
            raise ConfigError(f"val_items={self.val_items}; the CKA of head maps and lambda "
                              "selection needs at least 4 validation items")
        small = [n for n in self.regimes if n < 1]
        bad = [x for x in (*self.lrs, *self.lambdas, self.control_lr) if not x > 0]
        if small or bad:
            raise ConfigError(f"regimes {small}, lrs/lambdas/control_lr {bad}: each must be "
                              "positive")
        if min(self.regimes) < self.distill.batch_size:
            raise ConfigError(f"regimes {sorted(self.regimes)}: {min(self.regimes)} training items "
                              f"cannot fill one batch of {self.distill.batch_size}; lower "
                              "batch_size or give more items")
        for lr in {*self.lrs, self.control_lr}:
            replace(self.distill, lr=lr)  # DistillConfig refuses a rate it could not train with
        for role, value in self.fingerprints.items():
            if role not in ROLES or not isinstance(value, str) or len(value) != 64:
                raise ConfigError(f"fingerprints[{role!r}] = {value!r}: give a teacher's or "
                                  "student's 64-digit hex fingerprint")
        for head, column in self.teacher_positions.items():
            Head.parse(head)  # a bad name raises ValueError naming it
            if not str(column).startswith("pos_"):
                raise ConfigError(f"teacher_positions[{head!r}] = {column!r}: name a position "
                                  "column, e.g. 'pos_prev_label'")
