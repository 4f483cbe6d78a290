"""``DistillConfig``: the settings of one distillation run, checked where they are made.

Its named choices (``Trainable``, ``KVPolicy``, ``Labels``) are ``Literal`` types to a static type
checker and plain strings at run time, so that ``asdict`` of a config (what a saved run is compared
by) and its JSON are those of any other string field, and so that a runtime type checker (the test
suite runs beartype over cdist) lets a wrong choice reach ``__post_init__``, whose ``ConfigError``
names the field, the value and the choices: one message, with or without the checker.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from cdist import limits
from cdist.errors import ConfigError

__all__ = ["CHOICES", "DistillConfig", "KVPolicy", "Labels", "Trainable"]

if TYPE_CHECKING:
    # What trains: the head map's student heads (circuit distillation) or every weight.
    Trainable = Literal["heads", "all"]
    # Which slices of a trained head train: its query and output weights, or also its key/value
    # group's, which grouped-query attention shares between several query heads.
    KVPolicy = Literal["qo", "group"]
    # What CE is taken against: the teacher's predicted answer, or the items' own answers.
    Labels = Literal["teacher", "answers"]
else:
    Trainable = KVPolicy = Labels = str

# The choices of each named field, as the Literal types above list them.
CHOICES: dict[str, tuple[str, ...]] = {"labels": ("teacher", "answers"),
                                       "trainable": ("heads", "all"),
                                       "kv_policy": ("qo", "group")}


@dataclass(frozen=True)
class DistillConfig:
    """One distillation run (``cdist.distill``'s package doc gives the loss).

    Attributes:
        steps: optimizer steps.
        lr: AdamW (Loshchilov & Hutter 2019) learning rate. Wadhwa et al. (2025) use 2e-5 for
            Llama-3; small students trained for a few hundred steps need far larger rates for CE
            to move, and at such rates Adam also follows a CKA target that carries no task
            signal, so pick lr and ``cka_weight`` on validation items and read ``grad_ratio``.
        batch_size: prompts per step (also the m of CKA).
        ce_weight: weight of CE on the labels (0 for "Align CKA only").
        cka_weight: lambda, the weight of sum (1 - CKA) over the head map's pairs (0 for "CE only").
        kd_weight: weight of logit KD (Hinton et al. 2015; the standard-distillation baseline) at
            temperature ``kd_temperature``.
        trainable: "heads" (the head map's student heads) or "all" (full-parameter training).
        kv_policy: "qo" (only the heads' W_Q and W_O) or "group" (their key/value groups train too).
        cka_position: None (each pair at its own positions) or one position column for every pair.
        shuffle_teacher: permute the teacher's rows within each batch before CKA (the Shuffled CKA
            control).
        debiased_cka: train on the debiased estimator instead of the plain one (the plain one is
            logged too).
        weight_decay: AdamW weight decay on the trained parameters (deltas decay towards the base
            weights).
        eval_every: steps between evaluations (and checkpoints).
        seed: data order and the shuffled control's permutations.
        labels: what CE is taken against: "teacher" (the teacher's predicted answer, distillation)
            or "answers" (the items' own answers: plain task fine-tuning, which needs no teacher
            unless a CKA or KD term or a head map does).
    """

    steps: int = 300
    lr: float = 1e-3
    batch_size: int = 32
    ce_weight: float = 1.0
    cka_weight: float = 0.0
    kd_weight: float = 0.0
    kd_temperature: float = 2.0
    trainable: Trainable = "heads"
    kv_policy: KVPolicy = "qo"
    cka_position: str | None = None
    shuffle_teacher: bool = False
    debiased_cka: bool = False
    weight_decay: float = 0.0
    eval_every: int = 50
    seed: int = 0
    labels: Labels = "teacher"

    def __post_init__(self) -> None:
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                raise ConfigError(f"{name}={getattr(self, name)!r}; choose one of {choices}")
        for name in ("steps", "batch_size", "eval_every", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name}={value!r}; give a whole number")
        limits.check_seed("seed", self.seed)
        for name in ("shuffle_teacher", "debiased_cka"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r}; give True or False")
        for name in ("lr", "ce_weight", "cka_weight", "kd_weight", "kd_temperature",
                     "weight_decay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value):
                raise ConfigError(f"{name}={value!r}; give a finite number")
        self._check_ranges()

    def _check_ranges(self) -> None:
        if min(self.ce_weight, self.cka_weight, self.kd_weight, self.weight_decay) < 0:
            raise ConfigError("loss weights and weight_decay must be >= 0; got ce_weight="
                              f"{self.ce_weight}, cka_weight={self.cka_weight}, kd_weight="
                              f"{self.kd_weight}, weight_decay={self.weight_decay}")
        if self.ce_weight == self.cka_weight == self.kd_weight == 0:
            raise ConfigError("every loss weight is 0; set ce_weight, cka_weight or kd_weight")
        if self.steps < 1 or self.batch_size < 2 or self.eval_every < 1 or not self.lr > 0:
            raise ConfigError("steps, eval_every >= 1, batch_size >= 2 and lr > 0 are needed; "
                              f"got steps={self.steps}, batch_size={self.batch_size}, "
                              f"eval_every={self.eval_every}, lr={self.lr}")
        if self.lr > 1:  # AdamW moves each weight by about lr a step: past 1, it wipes them
            raise ConfigError(f"lr={self.lr} is above 1, which overwrites the weights within a "
                              "step; fine-tuning rates are about 1e-5 to 1e-2")
        if not self.kd_temperature > 0:
            raise ConfigError(f"kd_temperature={self.kd_temperature}; it divides the logits, so "
                              "give a number > 0 (2.0 is usual)")
        if self.cka_position is not None and not str(self.cka_position).startswith("pos_"):
            raise ConfigError(f"cka_position={self.cka_position!r}; name a position column, "
                              "e.g. 'pos_last', or None")
