"""Is a circuit faithful, and if not, how few more heads make it so.

A circuit stands for its model only if, alone (every other head mean-ablated at every position,
``circuit_eval.circuit_logits``), it keeps most of the model's accuracy: faithfulness = circuit
accuracy / full accuracy (Wadhwa et al. 2025 report 0.84-1.00 for their circuits). A path-patching
search can return a circuit that is not: its groups keep heads whose paths matter, but the task may
also need heads that no searched path reaches. ``grow_until_faithful`` adds heads from an ordered
list of candidates (the caller's: ``pipeline.circuits`` takes heads by their mean-ablation drop)
until the threshold holds or a cap is reached.

Our choices, for cost: one evaluation is a forward pass over the items with the circuit alone,
tens of seconds on SmolLM2, so growth does not add one head at a time. It
tries 1, 2, 4, ... candidates (doubling, then the cap itself), and once a size reaches the
threshold it bisects between that size and the last one that did not, so the result costs about
2 log2(cap) evaluations. Faithfulness is not quite monotone in the heads added, so the size found
is the smallest the bisection saw reach the threshold, not certainly the smallest that would;
``grow_one_at_a_time`` is the plain twin that finds that one, an evaluation per head (the tests'
oracle, and ``experiments/bench_discovery.py --growth-items``'s baseline).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from cdist.discovery.circuit_eval import per_item_correct
from cdist.errors import InputError
from cdist.models import HookedTransformer, check_heads
from cdist.progress import phase
from cdist.types import Circuit, Head

__all__ = ["circuit_accuracy", "grow_one_at_a_time", "grow_until_faithful"]


@torch.no_grad()
def circuit_accuracy(
    model: HookedTransformer,
    heads: Iterable[Head],
    data,
    means: Float[Tensor, "layer ref_pos head_index d_head"],
    *,
    batch_size: int = 64,
) -> float:
    """Top-1 accuracy on ``data`` with every head outside ``heads`` mean-ablated at every position
    (``circuit_eval.evaluate_circuit``'s circuit accuracy, without its full and random runs)."""
    heads = tuple(heads)
    if len(data) == 0:
        raise InputError("circuit_accuracy needs at least one item; the dataset is empty")
    check_heads(model, heads, "circuit heads")
    circuit = Circuit({"circuit": heads})
    correct = per_item_correct(model, data, circuit, means, batch_size=batch_size)
    return correct.double().mean().item()


def grow_until_faithful(
    model: HookedTransformer,
    heads: Sequence[Head],
    candidates: Sequence[Head],
    data,
    means: Float[Tensor, "layer ref_pos head_index d_head"],
    *,
    full_accuracy: float,
    threshold: float,
    max_heads: int,
    batch_size: int = 64,
    log: Callable[[str], None] | None = None,
    progress: bool = False,
) -> tuple[int | None, list[dict]]:
    """How many of ``candidates`` (taken in order) a circuit of ``heads`` needs for its
    faithfulness on ``data`` to reach ``threshold`` (module doc: doubling, then bisection).

    Args:
        model: a HookedTransformer.
        heads: the circuit's heads.
        candidates: heads to add, best first; those already in ``heads`` are skipped.
        data: the items faithfulness is measured on (held out from the circuit's discovery).
        means: the model's head means (``ablation.head_means``).
        full_accuracy: the model's accuracy on ``data`` (> 0).
        threshold: the faithfulness to reach.
        max_heads: the most heads the grown circuit may have.
        log: told each evaluation as it is made (each is a pass over ``data``).
        progress: show each evaluation while it runs (``cdist.progress.phase``).

    Returns:
        The number of (new) candidates to add, or None when even ``max_heads`` heads (or every
        candidate) do not reach ``threshold``; and each evaluation made, in order, as
        ``{"added", "heads", "circuit_accuracy", "faithfulness"}``.
    """
    if not full_accuracy > 0:
        raise InputError(f"full_accuracy={full_accuracy}; faithfulness needs a model that gets "
                         "something right")
    base = list(dict.fromkeys(heads))
    extra = [h for h in dict.fromkeys(candidates) if h not in base]
    most = min(len(extra), max_heads - len(base))
    tried: dict[int, dict] = {}

    def reaches(n: int) -> bool:
        with phase(f"growing: evaluating a circuit of {len(base) + n} heads", enabled=progress):
            accuracy = circuit_accuracy(model, base + extra[:n], data, means,
                                        batch_size=batch_size)
        tried[n] = {"added": n, "heads": len(base) + n, "circuit_accuracy": accuracy,
                    "faithfulness": accuracy / full_accuracy}
        if log is not None:
            log(f"  growing: {len(base) + n} heads keep faithfulness "
                f"{tried[n]['faithfulness']:.3f} (evaluation {len(tried)}, target {threshold})")
        return tried[n]["faithfulness"] >= threshold

    failed, passed, n = 0, None, 1
    while n <= most and passed is None:
        if reaches(n):
            passed = n
        else:
            failed = n
            n = most if n < most and 2 * n > most else 2 * n
    while passed is not None and passed - failed > 1:
        middle = (passed + failed) // 2
        passed, failed = (middle, failed) if reaches(middle) else (passed, middle)
    return passed, list(tried.values())


def grow_one_at_a_time(
    model: HookedTransformer,
    heads: Sequence[Head],
    candidates: Sequence[Head],
    data,
    means: Float[Tensor, "layer ref_pos head_index d_head"],
    *,
    full_accuracy: float,
    threshold: float,
    max_heads: int,
    batch_size: int = 64,
) -> tuple[int | None, int]:
    """``grow_until_faithful``'s plain twin: candidates are added one at a time, each size
    evaluated, until the threshold holds. Returns the number added (None: never within
    ``max_heads``) and the number of evaluations made."""
    base = list(dict.fromkeys(heads))
    extra = [h for h in dict.fromkeys(candidates) if h not in base]
    for n in range(1, min(len(extra), max_heads - len(base)) + 1):
        accuracy = circuit_accuracy(model, base + extra[:n], data, means, batch_size=batch_size)
        if accuracy / full_accuracy >= threshold:
            return n, n
    return None, min(len(extra), max_heads - len(base))
