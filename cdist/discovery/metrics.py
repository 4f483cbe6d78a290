"""What a discovery scan measures at the answer: its metric.

Every scan intervenes on heads and reads the logits at ``pos_last``. Three ways to read them:

- ``"prob"``: the answer's probability ``p`` (softmax in float32). Patching scores the relative
  change ``(p_patched - p_clean) / p_clean`` per item (Prakash et al. 2024's score, entity
  tracking's default); mean ablation the drop ``p_clean - p_ablated``. On a confident model ``p``
  saturates near 1, and a head whose path moves the answer's logit a great deal may move ``p``
  by 1e-6.
- ``"logit_diff"``: ``LD = logit(answer) - logit(contrast)``, the answer against its rival (Wang
  et al. 2022's logit(IO) - logit(S); Conmy et al. 2023), which does not saturate. Patching scores
  ``LD_patched - LD_clean``; mean ablation ``LD_clean - LD_ablated``. The rival is the items'
  ``contrast_id`` column (a task's choice: IOI's subject name, entity tracking's neighbouring
  object, a task file's counterfactual answer).
- ``"logit_diff_normalised"``: the same change divided by the items' mean gap between the clean
  and the corrupt prompt, ``D = mean(LD_clean - LD_corrupt)``, so that 0 is no effect and -1 is
  the whole of the corrupt prompt's effect. The mean of the scores is Wang et al.'s normalised
  form minus one: ``(mean LD_patched - mean LD_corrupt) / D - 1``. Dividing by the mean gap
  rather than each item's keeps an item whose two prompts nearly agree from dominating.

Scores are named after the metric (``relative_change``, ``logit_diff_change``,
``logit_diff_normalised_change`` for patching; ``prob_drop``, ``logit_diff_drop``,
``logit_diff_normalised_drop`` for ablation), so a scan's ranking metric says which was used.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

from cdist.discovery_names import METRICS, Metric
from cdist.errors import ConfigError, InputError
from cdist.evaluate import answer_stats, logits_at

__all__ = ["CONTRAST", "METRICS", "Metric", "Target", "check_gap", "check_metric", "columns",
           "measure", "score_name"]

# the items' column of each answer's rival in a logit difference
CONTRAST = "contrast_id"


class Target(NamedTuple):
    """What ``measure`` reads for each row: the answer, and its rival for a logit difference."""

    answer: Int[Tensor, " batch"]
    contrast: Int[Tensor, " batch"] | None = None

    @classmethod
    def of(cls, batch, metric: str) -> Target:
        """The target of a batch (or one item) of a task dataset under ``metric``."""
        def ids(name):
            return torch.as_tensor(batch[name], dtype=torch.long).reshape(-1)
        return cls(ids("answer_id"), ids(CONTRAST) if metric != "prob" else None)

    def repeat(self, n: int) -> Target:
        """The target of ``n`` stacked copies of the batch."""
        return Target(self.answer.repeat(n),
                      None if self.contrast is None else self.contrast.repeat(n))


def check_metric(metric: str, data=None) -> None:
    """Refuse an unknown metric, or a logit difference on items without a rival."""
    if metric not in METRICS:
        raise ConfigError(f"metric {metric!r}; choose from {', '.join(METRICS)}")
    if metric != "prob" and data is not None and CONTRAST not in data.column_names:
        raise InputError(f"metric {metric!r} needs each item's rival answer ({CONTRAST!r} column), "
                         f"which these items lack; use metric 'prob' or a task that names one")


def check_gap(gap: float, n: int) -> float:
    """``gap``, the items' mean clean-minus-corrupt logit difference, if it can normalise.

    Raises:
        InputError: the corrupt prompts do not lower the logit difference on average.
    """
    if not gap > 0:
        raise InputError(f"the corrupt prompts do not lower the logit difference (mean clean minus "
                         f"corrupt gap {gap:.3g} over {n} items), so nothing normalises it; use "
                         "metric 'logit_diff', or items whose counterfactual changes the answer")
    return gap


def columns(position: str | None, metric: str) -> tuple[str, ...]:
    """The batch columns a scan at ``position`` (None: every position) under ``metric`` reads
    besides the prompt and the answer."""
    return (() if position is None else (position,)) + ((CONTRAST,) if metric != "prob" else ())


def score_name(metric: str, kind: Literal["change", "drop"]) -> str:
    """The name of a scan's score under ``metric``: a patching ``change`` or an ablation
    ``drop`` (module doc)."""
    check_metric(metric)
    if metric == "prob":
        return "relative_change" if kind == "change" else "prob_drop"
    return f"{metric}_{kind}"


def measure(
    logits: Float[Tensor, "batch pos d_vocab"] | Float[Tensor, "batch d_vocab"],
    target: Target,
    metric: str,
    pos: Int[Tensor, " batch"] | None = None,
) -> tuple[Float[Tensor, " batch"], Float[Tensor, " batch"]]:
    """(the metric's value, 1.0 where the answer is the top-1 token), read at each row's ``pos``
    (None: the logits are already one row per example); float64, CPU. ``"prob"`` is the
    answer's probability, the others the logit difference; the softmax and the difference run in
    float32 even for a bfloat16 model."""
    last = logits if pos is None else logits_at(logits, pos)
    prob, correct = answer_stats(last, target.answer)
    if metric == "prob":
        return prob, correct
    last = last.float()
    pair = torch.stack([target.answer, target.contrast], 1).to(last.device)
    gathered = last.gather(-1, pair)
    return (gathered[:, 0] - gathered[:, 1]).double().cpu(), correct
