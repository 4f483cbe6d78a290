"""A circuit alone: keep its heads, mean-ablate every other head (``cdist.discovery.ablation``),
and score what is left against the full model and against random circuits of its size.

This is how a circuit's faithfulness is measured (Wadhwa et al. 2025; Wang et al. 2022's "circuit
alone"): ``circuit_logits`` runs the model so, ``per_item_correct`` scores each item, and
``evaluate_circuit`` reports full, circuit and random-circuit accuracy. With
``keep_at_positions`` a circuit's heads are kept only at their group's position, as Prakash et al.
do.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from cdist import limits
from cdist.discovery.ablation import make_mean_ablation_hook
from cdist.errors import InputError
from cdist.evaluate import answer_stats, batches, device_of, last_logits, pad_id
from cdist.models import HookedTransformer, check_heads
from cdist.progress import bar as progress_bar
from cdist.types import Circuit, Head

__all__ = ["circuit_logits", "evaluate_circuit", "per_item_correct"]



def circuit_logits(
    model: HookedTransformer,
    input_ids: Int[Tensor, "batch pos"],
    circuit_heads: Iterable[Head],
    means: Float[Tensor, "layer ref_pos head_index d_head"],
    *,
    keep_at: Mapping[Head, Sequence[Int[Tensor, " batch"]]] | None = None,
    pos: Int[Tensor, " batch"] | None = None,
) -> Float[Tensor, "batch pos d_vocab"] | Float[Tensor, "batch d_vocab"]:
    """The logits of the circuit alone: every head *not* in ``circuit_heads`` is mean-ablated
    everywhere.

    Args:
        model: a HookedTransformer.
        input_ids: the prompts.
        circuit_heads: the heads to keep.
        means: from ``head_means``.
        keep_at: optional head -> row positions (``[batch]`` index tensors) where that circuit head
            is kept; it is mean-ablated at every other position. Circuit heads missing from it are
            kept everywhere.
        pos: only each row's logits at its ``pos`` (``evaluate.last_logits``), ``[batch, d_vocab]``.

    Returns:
        The logits; exactly the unablated model's when ``circuit_heads`` is every head and
        ``keep_at`` is None.
    """
    n_layers, _, n_heads, _ = means.shape
    n_batch, n_pos = input_ids.shape
    keep = set(circuit_heads)
    hooks = []
    for layer in range(n_layers):
        kept = [h for h in range(n_heads) if Head(layer, h) in keep]
        if len(kept) == n_heads and not keep_at:
            continue  # nothing to ablate: no hook at all, so the layer runs bit for bit as usual
        ablate = torch.ones(n_batch, n_pos, n_heads, dtype=torch.bool)
        for h in kept:
            at = (keep_at or {}).get(Head(layer, h))
            if at is None:
                ablate[:, :, h] = False
            else:
                for where in at:
                    ablate[torch.arange(n_batch), where, h] = False
        hooks.append(make_mean_ablation_hook(layer, ablate, means))
    with model.hooks(fwd_hooks=hooks):
        if pos is not None:
            return last_logits(model, input_ids, pos)
        return model(input_ids.to(device_of(model)))


def _random_circuit(circuit: Circuit, n_layers: int, n_heads: int,
                    generator: torch.Generator) -> Circuit:
    """As many distinct random heads as ``circuit`` has, dealt into groups of its sizes and
    positions."""
    n = len(circuit.heads)
    order = torch.randperm(n_layers * n_heads, generator=generator)
    picked = [Head(int(i) // n_heads, int(i) % n_heads) for i in order[:n]]
    groups, start = {}, 0
    for name, heads in circuit.groups.items():
        # Wrapping around keeps every picked head in some group when a head of ``circuit`` is
        # in two groups.
        groups[name] = tuple(picked[(start + j) % n] for j in range(len(heads))) if n else ()
        start += len(heads)
    return Circuit(groups, positions=circuit.positions, model=circuit.model, method="random")


def per_item_correct(model: HookedTransformer, data, circuit: Circuit | None, means,
                     batch_size: int = 64, keep_at_positions: bool = False, bar=None) -> Tensor:
    """Per-item top-1 correctness, with everything outside ``circuit`` mean-ablated (None: the
    full model); ``bar`` advances a batch at a time."""
    at_positions = circuit is not None and keep_at_positions
    columns = sorted(set(circuit.positions.values())) if at_positions else []
    out = []
    for batch in batches(data, batch_size, pad_id(model), columns):
        ids, last = batch["input_ids"], batch["pos_last"]
        if circuit is None:
            logits = last_logits(model, ids, last)
        else:
            keep_at = None
            if keep_at_positions:
                keep_at = {}
                for name, heads in circuit.groups.items():
                    for h in heads:
                        keep_at.setdefault(h, []).append(batch[circuit.positions[name]])
            logits = circuit_logits(model, ids, circuit.heads, means, keep_at=keep_at, pos=last)
        out.append(answer_stats(logits, batch["answer_id"])[1])
        if bar is not None:
            bar.update()
    return torch.cat(out).bool()


def _circuit_to_evaluate(model: HookedTransformer, circuit_heads: Circuit | Iterable[Head], data,
                         means: Tensor, n_random: int, batch_size: int,
                         keep_at_positions: bool) -> Circuit:
    """``evaluate_circuit``'s arguments checked, and its circuit as a ``Circuit``."""
    if len(data) == 0:
        raise InputError("evaluate_circuit needs at least one item; the dataset is empty")
    for name, value, least in (("n_random", n_random, 0), ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise InputError(f"{name}={value!r}; give a whole number >= {least}")
    cfg = model.cfg
    if means.ndim != 4 or (means.shape[0], means.shape[2], means.shape[3]) != (
            cfg.n_layers, cfg.n_heads, cfg.d_head):
        raise InputError(f"means of shape {tuple(means.shape)} are not this model's "
                         f"[{cfg.n_layers} layers, positions, {cfg.n_heads} heads, {cfg.d_head}]; "
                         "make them with head_means(model, reference items)")
    if keep_at_positions and not isinstance(circuit_heads, Circuit):
        raise InputError("keep_at_positions needs a Circuit (its groups name the positions); "
                         "got bare heads")
    circuit = (circuit_heads if isinstance(circuit_heads, Circuit)
               else Circuit({"circuit": tuple(sorted(set(circuit_heads)))}))
    circuit.check_found_in(getattr(model, "source", None))  # load_llama's checkpoint path
    check_heads(model, circuit.heads, "circuit heads")
    limits.check_random_circuits(n_random, cfg.n_layers * cfg.n_heads, len(circuit), "the circuit")
    return circuit


@torch.no_grad()
def evaluate_circuit(
    model: HookedTransformer,
    circuit_heads: Circuit | Iterable[Head],
    data,
    *,
    means: Float[Tensor, "layer ref_pos head_index d_head"],
    n_random: int = 5,
    seed: int = 0,
    batch_size: int = 64,
    keep_at_positions: bool = False,
    progress: bool = False,
) -> dict:
    """Full, circuit and random-circuit accuracy, and faithfulness (circuit distillation's
    evaluation).

    The circuit's accuracy is the model's with every head outside the circuit mean-ablated at every
    position. The random baseline keeps as many heads, drawn uniformly without replacement from all
    heads (circuit heads included) with ``torch.Generator().manual_seed(seed)``, averaged over
    ``n_random`` draws.

    Args:
        model: a HookedTransformer.
        circuit_heads: a ``Circuit`` or any collection of heads.
        data: a task dataset (``input_ids``, ``answer_id``, ``pos_last``, and the circuit's position
            columns when ``keep_at_positions``).
        means: from ``head_means`` over a reference set.
        n_random: random head sets to average (0 skips the baseline: its numbers are nan).
        seed: their seed.
        batch_size: prompts per forward pass.
        keep_at_positions: keep each circuit head only at its group's position column (Prakash
            et al.'s stricter circuit), mean-ablating it elsewhere; needs a ``Circuit``. Random
            circuits then get the same group sizes and positions.
        progress: a progress bar over the batches of every pass (``cdist.progress``).

    Returns:
        ``full_accuracy``, ``circuit_accuracy``, ``random_accuracy`` (mean), ``random_accuracies``
        (list), ``faithfulness`` = circuit / full, ``random_faithfulness`` = random / full,
        ``faithfulness_above_random`` = (circuit - random) / (full - random), ``n_circuit_heads``,
        ``n_heads`` (in the model), and per-item ``full_correct`` / ``circuit_correct`` (bool
        tensors, for McNemar's test between methods).

    Warning:
        Faithfulness is undefined (``nan``) when the full model gets nothing right.
        Faithfulness can exceed 1 (a circuit may do better without the heads it leaves out).
    """
    circuit = _circuit_to_evaluate(model, circuit_heads, data, means, n_random, batch_size,
                                   keep_at_positions)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    with progress_bar((2 + n_random) * -(-len(data) // batch_size), "circuit evaluation",
                      enabled=progress, unit="batch") as bar:
        args = (means, batch_size, keep_at_positions, bar)
        full_correct = per_item_correct(model, data, None, *args)
        circuit_correct = per_item_correct(model, data, circuit, *args)
        generator = torch.Generator().manual_seed(seed)
        randoms = [per_item_correct(model, data,
                                    _random_circuit(circuit, n_layers, n_heads, generator),
                                    *args).float().mean().item() for _ in range(n_random)]
    full = full_correct.float().mean().item()
    circuit_acc = circuit_correct.float().mean().item()
    random_acc = sum(randoms) / len(randoms) if randoms else math.nan
    return {
        "full_accuracy": full,
        "circuit_accuracy": circuit_acc,
        "random_accuracy": random_acc,
        "random_accuracies": randoms,
        "faithfulness": circuit_acc / full if full > 0 else math.nan,
        "random_faithfulness": random_acc / full if full > 0 else math.nan,
        # How much of what the full model does beyond random circuits the circuit keeps: with an
        # answer that ablation leaves as the default (theory of mind's "unknown"), plain
        # faithfulness is high for anything.
        "faithfulness_above_random": (
            (circuit_acc - random_acc) / (full - random_acc) if full > random_acc else math.nan
        ),
        "n_circuit_heads": len(circuit.heads),
        "n_heads": n_layers * n_heads,
        "full_correct": full_correct,
        "circuit_correct": circuit_correct,
    }
