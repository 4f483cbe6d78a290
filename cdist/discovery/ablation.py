"""Mean ablation of attention heads: knock heads out and scan every head's effect (a circuit alone,
every other head knocked out, is scored by ``cdist.discovery.circuit_eval``).

A head is knocked out by replacing its output ``z`` (``cdist.models.hook_z``, the ``d_head`` vector
it computes before ``W_O``) with its mean over a reference set of prompts, position by position.
This is the ablation of Prakash et al. 2024 ("Fine-tuning enhances existing mechanisms") and of
circuit distillation's head matching (Wadhwa et al. 2025): the head keeps its average, task-generic
contribution and loses what it computes from the particular prompt, which keeps the residual stream
closer to its usual distribution than zeroing does.

Why ``hook_z``: a layer's attention output is ``sum_h z[..., h, :] @ W_O[h] + b_O``, so replacing
one head's ``z`` removes exactly that head's term and nothing else, and under grouped-query
attention ``z`` is still per *query* head, so a query head is ablated without touching its siblings.

Choices that are ours:
- Means are per absolute position: the mean at ``p`` is over the reference prompts that reach
  ``p`` (all of them for entity tracking, whose prompts of one template share a length); padding
  never enters a mean, and a prompt longer than every reference prompt cannot be ablated. The
  means' position axis is named ``ref_pos`` in signatures: it spans the longest reference prompt.
- Heads are ablated at every position unless positions are given; ``evaluate_circuit`` can also keep
  a circuit's heads only at their group's position (``keep_at_positions``), as Prakash et al. do.
- Scores are measured at ``pos_last`` against ``answer_id``: by default the answer's probability
  (softmax in float32; a logit difference with ``metric``, ``cdist.discovery.metrics``) and top-1
  correctness, averaged over the examples.

Hooks are ``(name, fn)`` pairs used inside ``with model.hooks(fwd_hooks=...)``, so that nothing
outlives the block; under ``torchrun`` each rank ablates its share of the heads.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from cdist.discovery import metrics
from cdist.discovery.engine import (
    CleanRun,
    Hook,
    budget_batch_size,
    clean_run,
    flat_heads,
    one_head_scan,
    passes_per_batch,
    rank_heads,
    replace_heads,
    sum_over_ranks,
)
from cdist.discovery.metrics import Target
from cdist.discovery.resume import RunningSums, scan_key
from cdist.distributed import is_main
from cdist.errors import InputError
from cdist.evaluate import batches, device_of, pad_id
from cdist.models import HookedTransformer, hook_z
from cdist.store import tensor_fingerprint
from cdist.types import Head, Scan

__all__ = ["ablated_logits", "head_ablation_scan", "head_ablation_scan_reference", "head_means",
           "make_mean_ablation_hook", "mean_ablation_hooks", "position_drops"]


# --------------------------------------------------------------------------------------------------
# Means and hooks
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def head_means(
    model: HookedTransformer, reference_data, *, batch_size: int = 64
) -> Float[Tensor, "layer ref_pos head_index d_head"]:
    """Every head's mean output ``z`` per position over a reference set of prompts.

    Only ``hook_z`` is cached (one ``[batch, pos, head_index, d_head]`` tensor per layer), and sums
    are kept in float64 so that the mean does not depend on the batch size.

    Args:
        model: a HookedTransformer.
        reference_data: a task dataset with an ``input_ids`` column (prompts may differ in length).
        batch_size: prompts per forward pass.

    Returns:
        ``means[layer, pos]``: the mean over the reference prompts at least ``pos + 1`` tokens long,
        for ``pos`` up to the longest prompt; in the model's dtype and on its device.
    """
    if len(reference_data) == 0:
        raise InputError("head_means needs at least one reference prompt; the dataset is empty")
    cfg, device = model.cfg, device_of(model)
    width = max(len(ids) for ids in reference_data["input_ids"])
    sums = torch.zeros(cfg.n_layers, width, cfg.n_heads, cfg.d_head, dtype=torch.float64,
                       device=device)
    counts = torch.zeros(width, dtype=torch.float64, device=device)
    names = [hook_z(layer) for layer in range(cfg.n_layers)]  # a layer's heads share its hook
    for batch in batches(reference_data, batch_size, pad_id(model)):
        ids = batch["input_ids"].to(device)
        n_pos = ids.shape[1]
        real = (torch.arange(n_pos)[None, :] < batch["length"][:, None]).to(device)  # [batch, pos]
        _, cache = model.run_with_cache(ids, names_filter=names, return_type=None)
        for layer, name in enumerate(names):
            z = cache[name].double() * real[:, :, None, None]  # padding contributes nothing
            sums[layer, :n_pos] += z.sum(0)
        counts[:n_pos] += real.sum(0)
    return (sums / counts[None, :, None, None]).to(cfg.dtype)


def make_mean_ablation_hook(
    layer: int,
    heads: Bool[Tensor, "*batch_pos head_index"] | Sequence[int],
    means: Float[Tensor, "layer ref_pos head_index d_head"],
    positions: Int[Tensor, " batch"] | Bool[Tensor, "batch pos"] | None = None,
) -> Hook:
    """A ``hook_z`` hook of one layer that replaces chosen heads' outputs by their reference means.

    Args:
        layer: the layer.
        heads: which heads to ablate: head indices, a ``[head_index]`` mask (the same for every
            row), a ``[batch, head_index]`` mask (a different ablation per row, for batched scans)
            or a ``[batch, pos, head_index]`` mask (anything else).
        means: from ``head_means``; positions beyond the input are not used.
        positions: where to ablate: every position (None), one position per row (``[batch]`` indices
            such as a dataset's ``pos_last``), or a ``[batch, pos]`` mask.

    Returns:
        ``(name, fn)`` for ``model.hooks(fwd_hooks=[...])``.

    Raises (when the hook runs):
        ValueError: the input is longer than the longest reference prompt of ``means``.
    """
    layer_means = means[layer]  # [pos, head_index, d_head]
    if not isinstance(heads, Tensor):
        mask = torch.zeros(layer_means.shape[1], dtype=torch.bool)
        mask[torch.as_tensor(list(heads), dtype=torch.long)] = True
        heads = mask

    def mean_ablate(z: Float[Tensor, "batch pos head_index d_head"], hook) -> Tensor:
        n_pos = z.shape[1]
        if n_pos > layer_means.shape[0]:
            raise InputError(
                f"the input has {n_pos} positions but the means cover {layer_means.shape[0]}; "
                "compute head_means on reference prompts at least as long as the prompts you ablate"
            )
        return replace_heads(z, heads, layer_means[:n_pos], positions)

    return hook_z(layer), mean_ablate


def mean_ablation_hooks(
    heads: Iterable[Head],
    means: Float[Tensor, "layer ref_pos head_index d_head"],
    positions: Int[Tensor, " batch"] | Bool[Tensor, "batch pos"] | None = None,
) -> list[Hook]:
    """One ``make_mean_ablation_hook`` per layer that has a head in ``heads``; none for an
    empty set.
    """
    by_layer: dict[int, list[int]] = {}
    for h in sorted(set(heads)):
        by_layer.setdefault(h.layer, []).append(h.head)
    return [make_mean_ablation_hook(layer, hs, means, positions) for layer, hs in by_layer.items()]


def ablated_logits(
    model: HookedTransformer,
    input_ids: Int[Tensor, "batch pos"],
    heads: Iterable[Head],
    means: Float[Tensor, "layer ref_pos head_index d_head"],
    positions: Int[Tensor, " batch"] | Bool[Tensor, "batch pos"] | None = None,
) -> Float[Tensor, "batch pos d_vocab"]:
    """The model's logits with ``heads`` mean-ablated (at ``positions``, default all)."""
    with model.hooks(fwd_hooks=mean_ablation_hooks(heads, means, positions)):
        return model(input_ids.to(device_of(model)))


# --------------------------------------------------------------------------------------------------
# Scanning every head
# --------------------------------------------------------------------------------------------------


def _ablation_scan(value: tuple[Tensor, Tensor], correct: tuple[Tensor, Tensor], n: int,
                   shape: tuple[int, int], position: str | None, metric: str = "prob",
                   gap: float | None = None) -> Scan:
    """The ``Scan`` from sums over ``n`` items of the clean and per-head ablated value of the
    metric and correctness; ``gap``, the items' mean clean-minus-corrupt value, normalises
    ``"logit_diff_normalised"``."""
    scores = {}
    kind = "prob" if metric == "prob" else "logit_diff"
    for name, (base, ablated) in ((kind, value), ("accuracy", correct)):
        ablated = (ablated / n).reshape(shape)
        scores |= {f"{name}_drop": base / n - ablated, f"{name}_ablated": ablated}
    if metric == "logit_diff_normalised":
        scores["logit_diff_normalised_drop"] = (scores["logit_diff_drop"]
                                                / metrics.check_gap(gap, n))
    return Scan("mean_ablation", scores, metrics.score_name(metric, "drop"), position=position,
                n_items=n)


@torch.no_grad()
def head_ablation_scan(
    model: HookedTransformer,
    data,
    *,
    means: Float[Tensor, "layer ref_pos head_index d_head"],
    batch_size: int = 32,
    heads_per_pass: int = 8,
    memory_budget: float | None = None,
    position: str | None = None,
    metric: str = "prob",
    progress: bool = False,
    resume: str | Path | None = None,
) -> Scan:
    """Mean-ablate every head alone and measure how much the task suffers.

    Batched: each forward pass stacks ``heads_per_pass`` copies of a batch of ``batch_size`` prompts
    along the batch axis, and copy ``j`` ablates a different head (the hooks take a
    ``[rows, head_index]`` mask), so a model with ``n_layers * n_heads`` heads needs about
    ``n_layers * n_heads / heads_per_pass + 1`` passes per batch. ``head_ablation_scan_reference``
    is its one-head-one-prompt-at-a-time twin. Under ``torchrun`` each rank ablates its share of
    the heads and every rank returns the whole scan (every rank must call it).

    Args:
        model: a HookedTransformer.
        data: a task dataset (``input_ids``, ``answer_id``, ``pos_last``, and ``position``
            if given).
        means: from ``head_means``.
        batch_size: prompts per batch; a pass holds ``batch_size * heads_per_pass`` rows.
        memory_budget: GiB of activations the scan may hold; if given, it replaces
            ``batch_size`` (``engine.budget_batch_size``).
        heads_per_pass: ablation variants per forward pass.
        position: a position column; ablate only there (default: every position).
        metric: what is read at the answer (``cdist.discovery.metrics``); a logit difference
            needs the items' ``contrast_id``, its normalised form their ``corrupt_input_ids``.
        progress: a progress bar over batches (``cdist.progress``; rank 0's under ``torchrun``).
        resume: a file for the running sums after each batch (``RunningSums``: when a killed
            scan resumes from it bit for bit); removed when the scan returns.

    Returns:
        A ``Scan`` (method "mean_ablation", ranked by the metric's drop) of ``[layer, head_index]``
        float32 CPU tensors: ``prob_drop`` (mean over examples of the answer's probability at
        ``pos_last``, base minus ablated), ``accuracy_drop``, and ``prob_ablated`` /
        ``accuracy_ablated`` (the ablated values, which head matching's teacher side needs: dP_t
        = P_s_base - P_t_abl); ``logit_diff_*`` for the first pair under a logit difference, and
        ``logit_diff_normalised_drop`` (over the clean-minus-corrupt gap) when normalised.
    """
    if len(data) == 0:
        raise InputError("head_ablation_scan needs at least one item; the dataset is empty")
    metrics.check_metric(metric, data)
    normalised = metric == "logit_diff_normalised"
    if memory_budget is not None:
        batch_size = budget_batch_size(model, data, heads_per_pass, memory_budget)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    n_all = n_layers * n_heads
    mine = rank_heads(torch.arange(n_all))  # every head, with one process
    columns = metrics.columns(position, metric)
    key = None if resume is None else scan_key(
        "mean_ablation", model, data, [*columns, *(["corrupt_input_ids"] if normalised else [])],
        means=tensor_fingerprint(means), batch_size=batch_size, heads_per_pass=heads_per_pass,
        position=position, metric=metric)
    zero, zeros = torch.zeros((), dtype=torch.float64), torch.zeros(n_all, dtype=torch.float64)
    running = RunningSums(resume, key, prob_base=zero, correct_base=zero.clone(), gap=zero.clone(),
                          prob_abl=zeros, correct_abl=zeros.clone())
    per_batch = passes_per_batch(mine, n_layers, n_heads, heads_per_pass)
    with running.bar("mean-ablation scan", -(-len(data) // batch_size), per_batch,
                     progress and is_main()) as bar:
        for batch in running.pending(batches(data, batch_size, pad_id(model), columns,
                                             corrupt=normalised)):
            running.add(**_batch_sums(model, batch, means, mine, position, metric,
                                      heads_per_pass, bar.update))
    sums = running.sums
    prob_abl, correct_abl = sum_over_ranks(sums["prob_abl"], sums["correct_abl"])
    scan = _ablation_scan((sums["prob_base"], prob_abl), (sums["correct_base"], correct_abl),
                          len(data), (n_layers, n_heads), position, metric,
                          float(sums["gap"]) / len(data))
    running.finish()
    return scan


def _batch_sums(model: HookedTransformer, batch, means: Tensor, mine: Tensor,
                position: str | None, metric: str, heads_per_pass: int, on_pass,
                clean: CleanRun | None = None) -> dict:
    """One batch's sums for ``head_ablation_scan``: the clean metric and correctness, the same
    with each of this rank's heads ablated (zero on the other ranks' heads), and the
    clean-minus-corrupt gap when the metric is normalised; ``clean``: the batch's clean run,
    where the caller shares one."""
    def ablate(layer, rows, n_copies):
        at = None if position is None else batch[position].repeat(n_copies)
        return make_mean_ablation_hook(layer, rows, means, at)

    target, device = Target.of(batch, metric), device_of(model)
    p, c, p_abl, c_abl = one_head_scan(model, batch["input_ids"].to(device), target,
                                       batch["pos_last"], ablate, metric=metric,
                                       heads_per_pass=heads_per_pass, heads=mine, on_pass=on_pass,
                                       clean=clean)
    sums = {"prob_base": p.sum(), "correct_base": c.sum()}
    if metric == "logit_diff_normalised":
        corrupt = model(batch["corrupt_input_ids"].to(device))
        sums["gap"] = (p - metrics.measure(corrupt, target, metric, batch["pos_last"])[0]).sum()
    # the other heads, NaN in p_abl, are other ranks'
    sums["prob_abl"], sums["correct_abl"] = torch.zeros(2, len(p_abl), dtype=torch.float64)
    sums["prob_abl"][mine], sums["correct_abl"][mine] = p_abl[mine].sum(1), c_abl[mine].sum(1)
    return sums


@torch.no_grad()
def position_drops(
    model: HookedTransformer,
    data,
    heads: Sequence[Head | str],
    means: Float[Tensor, "layer ref_pos head_index d_head"],
    columns: Sequence[str],
    *,
    batch_size: int = 64,
    heads_per_pass: int = 8,
    progress: bool = False,
    resume: str | Path | None = None,
) -> Float[Tensor, "column head"]:
    """Each of ``heads`` mean-ablated at one position column only, for each of ``columns``: the
    mean drop of the answer's probability, ``[column, head]`` in the orders given (float64).

    The scan of ``head_ablation_scan(position=column)`` restricted to ``heads``, every column in
    the same pass over the items, so that a killed run resumes from its last whole batch
    (``resume``, as there); ``head_ablation_scan_reference`` with ``position`` is its slow twin.
    Every process measures every head (no ``torchrun`` split: a few heads, not a model's all).
    """
    n_layers, n_heads, metric = model.cfg.n_layers, model.cfg.n_heads, "prob"
    flat = flat_heads(heads, n_layers, n_heads)  # sorted, each once: the order one scan runs in
    heads = [Head.parse(h) if isinstance(h, str) else h for h in heads]
    order = torch.tensor([h.layer * n_heads + h.head for h in heads], dtype=torch.long)
    key = None if resume is None else scan_key(
        "position_drops", model, data, columns, means=tensor_fingerprint(means),
        heads=[str(h) for h in heads], batch_size=batch_size, heads_per_pass=heads_per_pass)
    running = RunningSums(resume, key,
                          drop=torch.zeros(len(columns), n_layers * n_heads, dtype=torch.float64))
    per_batch = len(columns) * passes_per_batch(flat, n_layers, n_heads, heads_per_pass)
    with running.bar("where heads work", -(-len(data) // batch_size), per_batch, progress) as bar:
        for batch in running.pending(batches(data, batch_size, pad_id(model), columns)):
            drop = torch.zeros(len(columns), n_layers * n_heads, dtype=torch.float64)
            # one clean run for every column: they differ only in where the mean is written
            clean = clean_run(model, batch["input_ids"].to(device_of(model)),
                              Target.of(batch, metric), batch["pos_last"], metric)
            for j, column in enumerate(columns):
                sums = _batch_sums(model, batch, means, flat, column, metric, heads_per_pass,
                                   bar.update, clean)
                drop[j] = sums["prob_base"] - sums["prob_abl"]
            running.add(drop=drop)
    drops = running.sums["drop"][:, order] / len(data)
    running.finish()
    return drops


@torch.no_grad()
def head_ablation_scan_reference(
    model: HookedTransformer,
    data,
    *,
    means: Float[Tensor, "layer ref_pos head_index d_head"],
    position: str | None = None,
    metric: str = "prob",
) -> Scan:
    """The slow twin of ``head_ablation_scan``: one head, one unpadded prompt, one forward
    pass at a time.

    It writes the mean into ``z`` by plain indexing instead of the masks of
    ``make_mean_ablation_hook``, so the two share nothing but the model. A test oracle; use
    ``head_ablation_scan`` for real work.
    """
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    device = device_of(model)
    metrics.check_metric(metric, data)
    prob_base = correct_base = gap = 0.0
    prob_abl = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    correct_abl = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    for item in data:
        ids = torch.tensor([item["input_ids"]], device=device)
        target, last = Target.of(item, metric), torch.tensor([item["pos_last"]])
        at = slice(None) if position is None else item[position]
        p, c = metrics.measure(model(ids), target, metric, last)
        prob_base, correct_base = prob_base + p.item(), correct_base + c.item()
        if metric == "logit_diff_normalised":
            corrupt = model(torch.tensor([item["corrupt_input_ids"]], device=device))
            gap += p.item() - metrics.measure(corrupt, target, metric, last)[0].item()
        for layer in range(n_layers):
            for head in range(n_heads):

                def replace(z, hook, layer=layer, head=head, at=at):
                    z = z.clone()
                    z[0, at, head] = means[layer, : z.shape[1], head][at].to(z)
                    return z

                with model.hooks(fwd_hooks=[(hook_z(layer), replace)]):
                    p, c = metrics.measure(model(ids), target, metric, last)
                prob_abl[layer, head] += p.item()
                correct_abl[layer, head] += c.item()
    return _ablation_scan((torch.tensor(prob_base, dtype=torch.float64), prob_abl),
                          (torch.tensor(correct_base, dtype=torch.float64), correct_abl), len(data),
                          (n_layers, n_heads), position, metric, gap / len(data))
