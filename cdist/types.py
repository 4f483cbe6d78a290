"""The vocabulary of cdist: attention heads, ablation kinds, circuits and per-head scores.

Every other module speaks in these words, so they are plain frozen dataclasses and enums with no
behaviour beyond naming, ordering and converting themselves to and from plain dicts. They neither
read nor write files (``cdist.records`` does) nor draw (``cdist.plots`` does), so that any module
can import them without pulling in I/O or plotting, and no import leads from here back to those.
Nothing here knows TransformerLens: hook names and weight layouts live in ``cdist.models`` alone.

Naming follows EAP-IG (Hanna et al. 2024, "Have Faith in Faithfulness"): the head with index 5 of
layer 3 prints as ``a3.h5`` and ``Head.parse`` reads it back, which is also how heads are written in
JSON files and figure labels.
"""

from __future__ import annotations

import enum
import operator
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePath

import torch
from jaxtyping import Float
from torch import Tensor

from cdist.errors import ConfigError, InputError, MismatchError

__all__ = ["Ablation", "Circuit", "Head", "HeadPair", "HeadScores", "Scan"]

_HEAD_RE = re.compile(r"^a(\d+)\.h(\d+)$")


def _is_index(value) -> bool:
    """A whole number (int, numpy or 0-d tensor integer), not a bool, float or string."""
    if isinstance(value, bool):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


@dataclass(frozen=True, order=True)
class Head:
    """One attention (query) head: ``Head(3, 5)``, printed ``a3.h5``; sorts by layer, then head.

    Under grouped-query attention a head is a *query* head. Its output ``z`` (the ``d_head`` vector
    before ``W_O``) is its own, while its keys and values are shared with the other query heads of
    its group (see ``kv_head``).
    """

    layer: int
    head: int

    def __post_init__(self) -> None:
        whole = all(_is_index(v) for v in (self.layer, self.head))
        if not whole or self.layer < 0 or self.head < 0:
            raise InputError(f"Head({self.layer!r}, {self.head!r}): layer and head must be "
                             "whole numbers >= 0 (Head.parse reads 'a3.h5')")
        # plain ints, so that equal heads hash alike whatever integer type made them
        object.__setattr__(self, "layer", operator.index(self.layer))
        object.__setattr__(self, "head", operator.index(self.head))

    def __str__(self) -> str:
        return f"a{self.layer}.h{self.head}"

    @classmethod
    def parse(cls, text: str) -> Head:
        """The head named ``text``, as printed by ``str``: ``Head.parse("a3.h5") == Head(3, 5)``."""
        match = _HEAD_RE.match(text.strip())
        if match is None:
            raise InputError(f"{text!r} is not a head name; write heads as 'a<layer>.h<head>', "
                             "e.g. 'a3.h5'")
        return cls(int(match[1]), int(match[2]))

    def kv_head(self, n_heads: int, n_kv_heads: int | None) -> int:
        """The key/value head this query head reads under grouped-query attention.

        Query heads are split into ``n_kv_heads`` consecutive groups, as in transformers and
        TransformerLens: query head ``h`` uses key/value head ``h // (n_heads // n_kv_heads)``.

        Args:
            n_heads: query heads per layer.
            n_kv_heads: key/value heads per layer; ``None`` (plain multi-head attention) means
                ``n_heads``.
        """
        n_kv_heads = n_kv_heads or n_heads
        if n_heads % n_kv_heads:
            raise InputError(f"{n_heads} query heads cannot be split evenly over {n_kv_heads} "
                             "key/value heads")
        if self.head >= n_heads:
            raise InputError(f"{self} does not exist in a model with {n_heads} heads per layer")
        return self.head // (n_heads // n_kv_heads)


@dataclass(frozen=True, order=True)
class HeadPair:
    """A student head aligned with a teacher head, each read at a position column of the task's
    items.

    Printed ``a1.h0@pos_last -> a1.h7@pos_last``. CKA compares the student head's ``z`` at
    ``student_position`` with the teacher head's ``z`` at ``teacher_position``, one row per item.
    The default is the position where the teacher head does its work (its circuit group's position,
    or where its ablation matters most): a head read where it does nothing is nearly constant across
    items, and aligning with a constant teaches nothing.
    """

    student: Head
    teacher: Head
    student_position: str = "pos_last"
    teacher_position: str = "pos_last"

    def __str__(self) -> str:
        return f"{self.student}@{self.student_position} -> {self.teacher}@{self.teacher_position}"

    def to_dict(self) -> dict:
        return {"student": str(self.student), "teacher": str(self.teacher),
                "student_position": self.student_position,
                "teacher_position": self.teacher_position}

    @classmethod
    def from_dict(cls, d: Mapping | Sequence) -> HeadPair:
        """Inverse of ``to_dict``; also reads the older ``["a0.h4", "a0.h3"]`` form (both at
        ``pos_last``)."""
        if not isinstance(d, Mapping):
            student, teacher = d
            return cls(Head.parse(student), Head.parse(teacher))
        if not {"student", "teacher"} <= set(d):
            raise InputError(f"a head pair names its 'student' and 'teacher' heads; got {dict(d)}")
        return cls(Head.parse(d["student"]), Head.parse(d["teacher"]),
                   d.get("student_position", "pos_last"), d.get("teacher_position", "pos_last"))


class Ablation(str, enum.Enum):
    """What replaces a knocked-out head's output ``z``.

    - ``MEAN``: its mean over a reference set of prompts, per position (Prakash et al. 2024; cdist's
      default).
    - ``ZERO``: zeros (moves the residual stream off-distribution; kept for comparison).
    - ``RESAMPLE``: its value on another prompt (the corrupted run of path patching).
    """

    MEAN = "mean"
    ZERO = "zero"
    RESAMPLE = "resample"


def _heads(items: Iterable[Head | str]) -> tuple[Head, ...]:
    if isinstance(items, (str, Head)):
        raise InputError(f"{items!r} where a list of heads goes; write [{str(items)!r}]")
    return tuple(h if isinstance(h, Head) else Head.parse(h) for h in items)


@dataclass(frozen=True)
class Circuit:
    """A task circuit: named groups of heads, the prompt position each group acts at, and how it was
    found.

    Entity tracking's circuit (Prakash et al. 2024) has four groups, e.g. ``{"value_fetcher":
    (a5.h3, ...), "position_transmitter": ..., "position_detector": ..., "structure_reader": ...}``,
    acting at ``pos_last``, ``pos_last``, ``pos_query_label`` and ``pos_prev_label``; a circuit
    found by mean ablation alone has one group. Positions are names of a task dataset's position
    columns, so that one circuit applies to every prompt of the task.

    Heads may be given as ``Head``s or names (``"a3.h5"``); within a group they keep their given
    order (best first, by convention). ``groups``, ``positions`` and ``scores`` are dicts for easy
    reading; treat them as read-only.

    Attributes:
        groups: group name -> its heads (given as ``Head``s or names; held as tuples of ``Head``).
        positions: group name -> position column (default ``"pos_last"`` for every group).
        scores: optional head -> the score it was selected by (the method's metric); heads as in
            ``groups``.
        model: name of the model the circuit belongs to.
        method: how it was found ("path_patching", "mean_ablation", ...).
    """

    groups: Mapping[str, Sequence[Head | str]]
    positions: Mapping[str, str] = field(default_factory=dict)
    scores: Mapping[Head | str, float] | None = None
    model: str = ""
    method: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.groups, Mapping) or not isinstance(self.positions, Mapping):
            raise InputError(f"Circuit({self.groups!r}): groups (and positions) are a dict, "
                             "e.g. Circuit({'circuit': ['a0.h1']})")
        groups = {str(name): _heads(heads) for name, heads in self.groups.items()}
        unknown = set(self.positions) - set(groups)
        if unknown:
            raise ConfigError(f"positions name groups {sorted(unknown)} that the circuit does not "
                              "have")
        positions = {name: str(self.positions.get(name, "pos_last")) for name in groups}
        object.__setattr__(self, "groups", groups)
        object.__setattr__(self, "positions", positions)
        if self.scores is not None:
            scores = {Head.parse(h) if isinstance(h, str) else h: float(s)
                      for h, s in self.scores.items()}
            object.__setattr__(self, "scores", scores)

    def check_found_in(self, source: str | None) -> None:
        """Refuse to read the circuit in a model loaded from ``source`` (a checkpoint's path;
        None: unknown) when it names another model (``MismatchError``): heads of one model name
        other heads, of another role, in the next."""
        if self.model and source and PurePath(self.model).name != PurePath(source).name:
            raise MismatchError(f"the circuit was found in {self.model}, not in this model "
                                f"({source}); evaluate it on its own model, or pass its heads "
                                "(circuit.heads) to evaluate them here")

    @property
    def heads(self) -> tuple[Head, ...]:
        """Every head of every group, each once, sorted by (layer, head)."""
        return tuple(sorted({h for heads in self.groups.values() for h in heads}))

    def __len__(self) -> int:
        return len(self.heads)

    def to_dict(self) -> dict:
        """A JSON-ready dict; heads are written as names (``"a3.h5"``)."""
        return {
            "model": self.model,
            "method": self.method,
            "groups": {name: [str(h) for h in heads] for name, heads in self.groups.items()},
            "positions": dict(self.positions),
            "scores": None if self.scores is None else {str(h): s for h, s in self.scores.items()},
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> Circuit:
        """Inverse of ``to_dict``."""
        return cls(
            groups=d["groups"],
            positions=d.get("positions", {}),
            scores=d.get("scores"),
            model=d.get("model", ""),
            method=d.get("method", ""),
        )


# tensors have no single truth value, so scores compare by identity
@dataclass(frozen=True, eq=False)
class HeadScores:
    """One number per head of a model, from a discovery method: ``scores[layer, head]``.

    Attributes:
        scores: ``Float[Tensor, "layer head_index"]``.
        metric: what the number is ("prob_drop", "relative_prob_change", ...).
        higher_is_important: whether large scores mark important heads (a probability drop) or small
            ones (path patching's relative change, where most negative is most important).
    """

    scores: Float[Tensor, "layer head_index"]
    metric: str
    higher_is_important: bool = True

    def __post_init__(self) -> None:
        if self.scores.ndim != 2:
            raise ConfigError("scores must be [layer, head_index]; "
                              f"got shape {tuple(self.scores.shape)}")

    def __getitem__(self, head: Head) -> float:
        return float(self.scores[head.layer, head.head])

    def top(self, k: int) -> tuple[Head, ...]:
        """The ``k`` most important heads, most important first (ties: lower (layer, head) first).

        NaN scores count as least important.
        """
        flat = self.scores.detach().flatten().double().cpu()
        flat = flat if self.higher_is_important else -flat
        flat = torch.nan_to_num(flat, nan=-float("inf"))
        # A stable sort keeps ties in (layer, head) order, so the result never depends on the
        # backend.
        order = torch.sort(flat, descending=True, stable=True).indices[:k]
        n_heads = self.scores.shape[1]
        return tuple(Head(int(i) // n_heads, int(i) % n_heads) for i in order)


METHODS = ("mean_ablation", "path_patching", "activation_patching", "attribution_patching")


@dataclass(frozen=True, eq=False)  # tensors have no single truth value
class Scan:
    """Every head's result from one discovery scan: ``scan["prob_drop"][layer, head]``.

    One record for every scan of ``cdist.discovery``, so that circuit selection
    (``discovery.select_heads``), figures (``plots.scan_figure``) and files
    (``records.write_record``, ``records.save_scan``) take any of them.

    Attributes:
        method: one of ``METHODS``.
        metrics: metric name -> ``Float[Tensor, "layer head_index"]`` (float32, CPU), e.g.
            ``prob_drop`` and ``accuracy_drop`` for mean ablation, ``relative_change`` and
            ``prob_change`` for patching.
        metric: the metric heads are ranked by (``ranking``); must be in ``metrics``.
        higher_is_important: whether large values of ``metric`` mark important heads.
        position: the position column the heads were intervened on (None: every position).
        receivers: path patching's receiver heads (empty: the logits); given as ``Head``s or names,
            held as a tuple of ``Head``.
        receiver_input: the receivers' input that carried the path ("q", "k", "v"), or None.
        n_items: how many items the metrics average over.
    """

    method: str
    metrics: Mapping[str, Float[Tensor, "layer head_index"]]
    metric: str
    higher_is_important: bool = True
    position: str | None = None
    receivers: Sequence[Head | str] = ()
    receiver_input: str | None = None
    n_items: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"scan method {self.method!r}; choose from {METHODS}")
        if self.metric not in self.metrics:
            raise ConfigError(f"ranking metric {self.metric!r} is not among the scan's "
                              f"{sorted(self.metrics)}")
        shapes = {tuple(t.shape) for t in self.metrics.values()}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise ConfigError("every metric must be one [layer, head_index] tensor; "
                              f"got shapes {sorted(shapes)}")
        metrics = {k: v.detach().float().cpu() for k, v in self.metrics.items()}
        object.__setattr__(self, "metrics", metrics)
        object.__setattr__(self, "receivers", _heads(self.receivers))

    def __getitem__(self, metric: str) -> Float[Tensor, "layer head_index"]:
        if metric not in self.metrics:
            raise KeyError(f"the {self.method} scan has no metric {metric!r}; "
                           f"it has {sorted(self.metrics)}")
        return self.metrics[metric]

    @property
    def shape(self) -> tuple[int, int]:
        """``(n_layers, n_heads)``."""
        return tuple(self[self.metric].shape)

    def ranking(self, metric: str | None = None) -> HeadScores:
        """The heads ranked by ``metric`` (default: the scan's own)."""
        metric = metric or self.metric
        higher = self.higher_is_important if metric == self.metric else True
        return HeadScores(self[metric], metric, higher_is_important=higher)

    def to_dict(self) -> dict:
        """A JSON-ready dict; tensors as nested lists, heads as names."""
        return {"method": self.method, "metric": self.metric,
                "higher_is_important": self.higher_is_important,
                "position": self.position, "receivers": [str(h) for h in self.receivers],
                "receiver_input": self.receiver_input, "n_items": self.n_items,
                "metrics": {k: v.tolist() for k, v in self.metrics.items()}}

    @classmethod
    def from_dict(cls, d: Mapping) -> Scan:
        """Inverse of ``to_dict``."""
        meta = {k: v for k, v in d.items() if k != "metrics"}
        meta["receivers"] = tuple(meta.get("receivers", ()))
        metrics = {k: torch.tensor(v, dtype=torch.float32) for k, v in d["metrics"].items()}
        return cls(metrics=metrics, **meta)
