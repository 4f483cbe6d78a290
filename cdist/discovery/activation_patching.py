"""Activation patching of attention heads: each head's *total* effect.

One head's output ``z`` (``cdist.models.hook_z``) comes from the run on the corrupt prompt (the
item's counterfactual, aligned token for token), the rest of the network recomputes, and the change
of the metric at ``pos_last`` is the head's score (``cdist.discovery.metrics``; by default
``relative_change`` = (p_patched - p_clean) / p_clean and ``prob_change`` = p_patched - p_clean of
the clean answer's probability), averaged over the items. Batched on ``cdist.discovery.engine``
(copy ``j`` of a stacked batch patches head ``j``, each pass starting at the patched layer);
``activation_patching_scan_reference`` is its one-head-one-prompt twin. Under ``torchrun`` each
rank patches only its share of the heads (``engine.rank_heads``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from cdist.discovery import metrics
from cdist.discovery.engine import (
    PatchSums,
    budget_batch_size,
    check_items,
    flat_heads,
    one_head_scan,
    one_item_runs,
    passes_per_batch,
    rank_heads,
    replacing,
)
from cdist.discovery.metrics import Target
from cdist.discovery.resume import RunningSums, scan_key
from cdist.distributed import is_main
from cdist.evaluate import batches, device_of, pad_id
from cdist.models import HookedTransformer, hook_z
from cdist.types import Head, Scan

__all__ = ["activation_patching_scan", "activation_patching_scan_reference"]


@torch.no_grad()
def activation_patching_scan(
    model: HookedTransformer,
    data,
    *,
    position: str | None = None,
    batch_size: int = 32,
    heads_per_pass: int = 8,
    memory_budget: float | None = None,
    heads: Sequence[Head | str] | None = None,
    metric: str = "prob",
    progress: bool = False,
    resume: str | Path | None = None,
) -> Scan:
    """Patch each head's ``z`` from the corrupt run into the clean run, alone, and
    measure the answer.

    Batched like ``head_ablation_scan`` (copy ``j`` of a stacked batch patches head ``j``). Under
    ``torchrun`` each rank patches its share of the heads and every rank returns the whole scan
    (every rank must call it).

    Args:
        model: a HookedTransformer.
        data: a task dataset with ``input_ids``, ``corrupt_input_ids``, ``answer_id``, ``pos_last``
            (and ``position`` if given).
        position: position column to patch at; None patches every position.
        batch_size: prompts per batch.
        memory_budget: GiB of activations the scan may hold; if given, it replaces
            ``batch_size`` (``engine.budget_batch_size``).
        heads_per_pass: heads per forward pass.
        heads: the heads to patch (e.g. a pre-filter's candidates); default every head. The
            others score NaN.
        metric: what is read at the answer (``cdist.discovery.metrics``).
        progress: show a tqdm bar over forward passes (rank 0's, under ``torchrun``).
        resume: a file for the running sums after each batch (``RunningSums``, which says when
            a killed scan resumes from it, bit for bit); removed when the scan returns.

    Returns:
        A ``Scan`` (method "activation_patching") with the metric's score, its ``_se`` and the
        absolute change (for ``"prob"``: ``relative_change``, ``relative_change_se``,
        ``prob_change``), ``[layer, head_index]``, float32, CPU.
    """
    check_items(data, position, metric)
    if memory_budget is not None:
        batch_size = budget_batch_size(model, data, heads_per_pass, memory_budget)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    asked = flat_heads(heads, n_layers, n_heads)
    mine = rank_heads(asked)
    columns = metrics.columns(position, metric)
    key = None if resume is None else scan_key(
        "activation_patching", model, data, ["corrupt_input_ids", *columns], position=position,
        heads=asked.tolist(), batch_size=batch_size, heads_per_pass=heads_per_pass, metric=metric)
    running = RunningSums(resume, key, **PatchSums(model, metric).state())
    per_batch = passes_per_batch(mine, n_layers, n_heads, heads_per_pass)
    with running.bar("activation patching", -(-len(data) // batch_size), per_batch,
                     progress and is_main()) as bar:
        for batch in running.pending(batches(data, batch_size, pad_id(model), columns,
                                             corrupt=True)):
            running.add(**_batch_sums(model, batch, mine, position, metric, heads_per_pass,
                                      bar.update).state())
    sums = PatchSums(model, metric)
    sums.load_state(running.sums)
    sums.add_other_ranks()
    running.finish()
    return sums.scan("activation_patching", len(data), position=position)


def _batch_sums(model: HookedTransformer, batch, mine: Tensor, position: str | None, metric: str,
                heads_per_pass: int, on_pass) -> PatchSums:
    """One batch's sums for ``activation_patching_scan``: each of this rank's heads patched from
    the corrupt run, and the items' clean-minus-corrupt gap."""
    device, sums = device_of(model), PatchSums(model, metric)
    names = [hook_z(layer) for layer in range(model.cfg.n_layers)]
    ids, target = batch["input_ids"].to(device), Target.of(batch, metric)
    corrupt_logits, corrupt = model.run_with_cache(batch["corrupt_input_ids"].to(device),
                                                   names_filter=names)

    def patch(layer, rows, n_copies):
        at = None if position is None else batch[position].repeat(n_copies)
        source = corrupt[names[layer]].repeat(n_copies, 1, 1, 1)
        return names[layer], replacing(rows, source, at)

    p_clean, _, p, _ = one_head_scan(model, ids, target, batch["pos_last"], patch, metric=metric,
                                     heads_per_pass=heads_per_pass, heads=mine, on_pass=on_pass)
    sums.add_batch(mine, p[mine] - p_clean[None, :], p_clean)
    sums.add_gap(p_clean, metrics.measure(corrupt_logits, target, metric, batch["pos_last"])[0])
    return sums


@torch.no_grad()
def activation_patching_scan_reference(
    model: HookedTransformer, data, *, position: str | None = None, metric: str = "prob"
) -> Scan:
    """The slow twin of ``activation_patching_scan``: one head, one unpadded prompt at a time."""
    sums = PatchSums(model, metric)
    for run in one_item_runs(model, data, position, metric):
        sums.add_gap(torch.tensor([run.p_clean]), torch.tensor([run.p_corrupt]))
        for layer in range(model.cfg.n_layers):
            for head in range(model.cfg.n_heads):

                def patch(z, hook, head=head, run=run):
                    z = z.clone()
                    z[0, run.at, head] = run.corrupt[hook.name][0, run.at, head]
                    return z

                with model.hooks(fwd_hooks=[(hook_z(layer), patch)]):
                    p = metrics.measure(model(run.ids), run.target, metric, run.last)[0].item()
                sums.add(layer, head, p - run.p_clean, run.p_clean)
    return sums.scan("activation_patching", len(data), position=position)
