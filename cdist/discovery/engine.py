"""The scan engine that every head scan of ``cdist.discovery`` runs on: replace heads,
one head per copy.

Mean ablation, activation patching and path patching all replace some heads' outputs ``z`` (the
``d_head`` vector a head computes before ``W_O``, at ``cdist.models.hook_z``) by other values:
reference means, or the ``z`` of a counterfactual run. ``replace_heads`` is that one rule. A scan
asks the question for every head alone; ``one_head_scan`` batches it, stacking copies of a batch of
prompts along the batch axis with copy ``j`` intervening on head ``j`` (``one_head_variants``),
starting each pass at the intervened layer from the clean run's cached residual stream and
unembedding only ``pos_last``. Each scan keeps a slow, plain twin (``*_reference``) in its own
module that the tests hold it to.

Under ``torchrun`` (``cdist.distributed``) each rank runs only its share of the heads
(``rank_heads``, interleaved so that every rank gets heads of every layer and about the same
cost) and the ranks add their per-head sums, zero on the heads they did not run
(``sum_over_ranks``), so that every rank returns the whole scan.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from cdist import distributed
from cdist.discovery import metrics
from cdist.discovery.metrics import Target
from cdist.errors import InputError
from cdist.evaluate import device_of
from cdist.models import (
    HookedTransformer,
    finish_layer,
    head_writes,
    hook_resid_mid,
    hook_resid_pre,
    hook_z,
    unembed,
)
from cdist.types import Head, Scan

__all__ = ["CleanRun", "Hook", "OneItem", "PatchSums", "budget_batch_size", "check_items",
           "clean_run", "flat_heads", "one_head_scan", "one_head_variants", "one_item_runs",
           "passes_per_batch", "patch_scan", "rank_heads", "replace_heads", "replacing",
           "row_bytes", "sum_over_ranks"]

Hook = tuple[str, Callable]


def replace_heads(
    z: Float[Tensor, "batch pos head_index d_head"],
    heads: Bool[Tensor, "*batch_pos head_index"],
    source: Float[Tensor, "*#batch #pos head_index d_head"],
    positions: Int[Tensor, " batch"] | Bool[Tensor, "batch pos"] | None = None,
) -> Float[Tensor, "batch pos head_index d_head"]:
    """``z`` with the chosen heads' vectors (at the chosen positions) taken from ``source``.

    The one replacement rule behind mean ablation (``source`` = the reference means,
    ``[pos, head_index, d_head]``) and activation and path patching (``source`` = another run's
    ``z``, ``[batch, pos, head_index, d_head]``).

    Args:
        z: one layer's head outputs.
        heads: a ``[head_index]`` mask (the same for every row), a ``[batch, head_index]`` mask (a
            different variant per row, for batched scans) or a ``[batch, pos, head_index]`` mask.
        source: the replacement values, broadcastable to ``z`` (``#``: a size-1 axis broadcasts, as
            path patching's ``[batch, 1, head_index, d_head]`` does).
        positions: where to replace: every position (None), one position per row (``[batch]``
            indices), or a ``[batch, pos]`` mask.
    """
    n_batch, n_pos, n_heads, _ = z.shape
    heads = heads.to(z.device)
    if heads.shape[-1] != n_heads:
        raise InputError(f"head mask has {heads.shape[-1]} heads; the layer has {n_heads}")
    if heads.ndim == 1:  # [head_index]
        mask = heads[None, None, :]
    elif heads.ndim == 2:  # [batch, head_index]: one variant per row
        mask = heads[:, None, :]
    elif heads.ndim == 3:  # [batch, pos, head_index]
        mask = heads
    else:
        raise InputError("head mask must be [head_index], [batch, head_index] or "
                         f"[batch, pos, head_index]; got shape {tuple(heads.shape)}")
    if positions is not None:
        positions = positions.to(z.device)
        if positions.dtype == torch.bool:  # [batch, pos]
            at = positions
        else:  # [batch]: one position per row
            at = torch.arange(n_pos, device=z.device)[None, :] == positions[:, None]
        mask = mask & at[:, :, None]
    replace = mask.expand(n_batch, n_pos, n_heads)[..., None]
    return torch.where(replace, source.to(z.device, z.dtype), z)


def one_head_variants(
    chunk: Int[Tensor, " copies"], n_heads: int, n_rows: int
) -> dict[int, Bool[Tensor, "rows head_index"]]:
    """Row masks for a batched one-head-at-a-time scan: copy ``j`` of a batch touches head
    ``chunk[j]`` only.

    ``chunk`` holds flat head indices (``layer * n_heads + head``); the batch of ``n_rows`` prompts
    is stacked ``len(chunk)`` times along the batch axis, copy ``j`` being rows
    ``j * n_rows .. (j + 1) * n_rows - 1``. Returns, for each layer that has a head in ``chunk``,
    the ``[copies * n_rows, head_index]`` mask to give ``replace_heads``.
    """
    out = {}
    for layer in chunk.div(n_heads, rounding_mode="floor").unique().tolist():
        variant = torch.zeros(len(chunk), n_heads, dtype=torch.bool)  # copy j touches chunk[j] ...
        in_layer = chunk // n_heads == layer  # ... if that head is in this layer
        variant[in_layer.nonzero()[:, 0], chunk[in_layer] % n_heads] = True
        out[layer] = variant.repeat_interleave(n_rows, dim=0)
    return out


class CleanRun(NamedTuple):
    """The clean pass ``one_head_scan`` starts its passes from: the metric and correctness per row,
    and the activations cached (every layer's ``hook_resid_pre``; the last layer's ``hook_z`` and
    ``hook_resid_mid``)."""

    prob: Float[Tensor, " batch"]
    correct: Float[Tensor, " batch"]
    cache: object  # TransformerLens' ActivationCache


def _cached(n_layers: int) -> tuple[list[str], list[str]]:
    """What the clean run caches: each layer's ``hook_resid_pre`` (where a pass starts), and the
    last layer's ``hook_z`` and ``hook_resid_mid`` (where its heads need no pass)."""
    return ([hook_resid_pre(layer) for layer in range(n_layers)],
            [hook_z(n_layers - 1), hook_resid_mid(n_layers - 1)])


def clean_run(model: HookedTransformer, ids: Int[Tensor, "batch pos"], target: Target,
              pos_last: Int[Tensor, " batch"], metric: str = "prob") -> CleanRun:
    """The clean pass of ``one_head_scan``, which scans that intervene on the same items
    differently (``ablation.position_drops``: one head's mean at each of several positions) share
    instead of running it once each."""
    names, top_names = _cached(model.cfg.n_layers)
    logits, cache = model.run_with_cache(ids, names_filter=names + top_names)
    return CleanRun(*metrics.measure(logits, target, metric, pos_last), cache)


def one_head_scan(
    model: HookedTransformer,
    ids: Int[Tensor, "batch pos"],
    target: Target,
    pos_last: Int[Tensor, " batch"],
    hook_for: Callable[[int, Bool[Tensor, "rows head_index"], int], Hook],
    *,
    metric: str = "prob",
    heads_per_pass: int = 8,
    heads: Int[Tensor, " scanned"] | None = None,
    on_pass: Callable[[], None] | None = None,
    clean: CleanRun | None = None,
) -> tuple[Tensor, Tensor, Float[Tensor, "heads batch"], Float[Tensor, "heads batch"]]:
    """Intervene on every head alone, many heads per forward pass; the engine of the
    batched head scans.

    A pass stacks ``n_copies`` copies of the batch along the batch axis, copy ``j`` intervening on
    head ``j`` of a chunk of one layer's heads through ``hook_for(layer, rows, n_copies)``, where
    ``rows`` is the ``[n_copies * batch, head_index]`` mask of ``one_head_variants``. Since the
    layers below the chunk's are untouched, the pass starts at its layer from the clean run's cached
    ``hook_resid_pre``, and only ``pos_last`` is unembedded. A last-layer head needs no pass at all:
    its hook is applied to the cached ``z`` and the change at ``pos_last`` goes through ``W_O`` and
    that position's MLP (``finish_layer``). ``hook_for`` must return a hook that changes only its
    layer's ``hook_z``, whatever its ``hook`` argument.

    Args:
        target: each row's answer (and its rival for a logit difference).
        metric: what is read at the answer (``cdist.discovery.metrics``).
        heads: flat indices (``layer * n_heads + head``) of the heads to intervene on; default
            every head. The others are not run and come back NaN.
        on_pass: called after each pass (progress bars).
        clean: ``clean_run`` of these ids, target, positions and metric, where the caller has it.

    Returns:
        The clean value of the metric and correctness ``[batch]``, and the same for each head's
        intervention, ``[layer * n_heads + head, batch]``; float64 on the CPU.
    """
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    n_rows = len(ids)
    top = n_layers - 1
    names, top_names = _cached(n_layers)
    p_base, c_base, cache = clean or clean_run(model, ids, target, pos_last, metric)
    if len(p_base) != n_rows:
        raise InputError(f"the clean run given has {len(p_base)} rows for {n_rows} prompts; "
                         "give the clean run of these prompts")
    prob = torch.full((n_layers * n_heads, n_rows), torch.nan, dtype=torch.float64)
    correct = torch.full((n_layers * n_heads, n_rows), torch.nan, dtype=torch.float64)
    scanned = torch.arange(n_layers * n_heads) if heads is None else heads.unique().cpu()
    for layer in range(n_layers):
        in_layer = scanned[scanned // n_heads == layer]
        for chunk in in_layer.split(heads_per_pass) if len(in_layer) else ():
            n_copies = len(chunk)
            rows = one_head_variants(chunk, n_heads, n_rows)[layer]
            name, fn = hook_for(layer, rows, n_copies)
            last = pos_last.repeat(n_copies).to(cache[names[0]].device)
            at = torch.arange(n_copies * n_rows, device=last.device)
            if layer == top:
                # Nothing reads the last layer's other positions, so the change of its z at
                # pos_last, through W_O and that position's MLP, is the whole effect: one position
                # instead of a forward pass.
                z = cache[name].repeat(n_copies, 1, 1, 1)
                dz = (fn(z, None) - z)[at, last]  # [rows, head_index, d_head]
                clean_rows = torch.arange(n_rows, device=last.device)
                mid_last = cache[top_names[1]][clean_rows, pos_last.to(last.device)]
                mid = mid_last.repeat(n_copies, 1) + head_writes(model, top, dz)
                final = finish_layer(model, top, mid)
            else:
                with model.hooks(fwd_hooks=[(name, fn)]):
                    final = model(cache[names[layer]].repeat(n_copies, 1, 1), start_at_layer=layer,
                                  stop_at_layer=n_layers)[at, last]
            p, c = metrics.measure(unembed(model, final), target.repeat(n_copies), metric)
            prob[chunk], correct[chunk] = p.view(n_copies, n_rows), c.view(n_copies, n_rows)
            if on_pass is not None:
                on_pass()
    return p_base, c_base, prob, correct


def passes_per_batch(scanned: Int[Tensor, " scanned"], n_layers: int, n_heads: int,
                     per_pass: int) -> int:
    """How many passes ``one_head_scan`` makes per batch for flat heads ``scanned`` (progress
    bars)."""
    per_layer = torch.bincount(scanned // n_heads, minlength=n_layers)
    return int((-(-per_layer // per_pass)).sum())


def flat_heads(heads, n_layers: int, n_heads: int) -> Int[Tensor, " scanned"]:
    """Heads (``Head``s or names) as sorted flat indices ``layer * n_heads + head``; None means
    every head.

    Raises:
        ValueError: a head outside the model (named).
    """
    if heads is None:
        return torch.arange(n_layers * n_heads)
    out = set()
    for h in heads:
        h = Head.parse(h) if isinstance(h, str) else h
        if not (0 <= h.layer < n_layers and 0 <= h.head < n_heads):
            raise InputError(f"head {h} is not in a model of {n_layers} layers x {n_heads} heads")
        out.add(h.layer * n_heads + h.head)
    return torch.tensor(sorted(out), dtype=torch.long)


def rank_heads(heads: Int[Tensor, " scanned"]) -> Int[Tensor, " share"]:
    """This rank's share of the flat heads (or senders) a scan runs: every ``world_size``-th
    (``cdist.distributed.share``), so that every rank gets heads of every layer and, since a pass
    costs more the lower its layer, about the same work; all of them with one process.

    Each rank's scan then adds only its share's results into per-head sums that start at zero, and
    ``sum_over_ranks`` puts the ranks' sums together.
    """
    return torch.tensor(distributed.share(heads.tolist()), dtype=torch.long)


def sum_over_ranks(*sums: Float[Tensor, " heads"]) -> tuple[Float[Tensor, " heads"], ...]:
    """Per-head sums of every rank's share of the heads (``rank_heads``), added up, on every rank;
    ``sums`` themselves with one process.

    Each rank's sums must be zero on the heads it did not run (not NaN): a head is then counted
    once, by the rank that ran it. One all-reduce for all of them; every rank must call it.
    """
    if not distributed.active():
        return sums
    return tuple(distributed.sum_across(torch.stack(sums)).unbind())


def replacing(heads: Tensor, source: Tensor, positions: Tensor | None) -> Callable:
    """A hook that writes ``source`` into the chosen heads (and positions) of its activation."""
    return lambda x, hook: replace_heads(x, heads, source, positions)


def patch_scan(
    method: str,
    total_rel: Float[Tensor, " heads"],
    total_diff: Float[Tensor, " heads"],
    n: int,
    shape: tuple[int, int],
    total_rel_sq: Float[Tensor, " heads"] | None = None,
    *,
    metric: str = "prob",
    gap: float | None = None,
    **where,
) -> Scan:
    """A patching scan's ``Scan`` from its per-head sums over ``n`` items of the per-item score
    and the absolute change of the metric (``cdist.discovery.metrics``: for ``"prob"`` the score
    is the relative change, Prakash et al.'s; for a logit difference the change itself, divided
    here by ``gap``, the mean clean-minus-corrupt logit difference, when normalised). Most
    negative: most important. With the sums of squares, ``<score>_se`` is each head's standard
    error of the mean over items (NaN with one item): the noise ``select_heads`` compares effects
    with.
    """
    name = metrics.score_name(metric, "change")
    scale = 1.0 / gap if metric == "logit_diff_normalised" else 1.0
    mean = total_rel / n
    scores = {name: (mean * scale).reshape(shape),
              "prob_change" if metric == "prob" else "logit_diff_change":
                  (total_diff / n).reshape(shape)}
    if metric == "logit_diff_normalised":
        scores["logit_diff_normalised"] = (1 + mean * scale).reshape(shape)
    if total_rel_sq is not None:
        var = (total_rel_sq / n - mean**2).clamp(min=0) * n / (n - 1) if n > 1 else mean * torch.nan
        scores[f"{name}_se"] = ((var / n).sqrt() * abs(scale)).reshape(shape)
    return Scan(method, scores, name, higher_is_important=False, n_items=n, **where)


@torch.no_grad()
def row_bytes(model: HookedTransformer, n_pos: int) -> int:
    """Bytes of every activation that TransformerLens hooks in one prompt's forward pass of
    ``n_pos`` positions, logits included: more than a pass ever holds at once, since most are freed
    as the pass goes on (measured on a one-row pass, so every hook of the model is counted)."""
    ids = torch.zeros(1, n_pos, dtype=torch.long, device=device_of(model))
    logits, cache = model.run_with_cache(ids)
    return sum(t.nbytes for t in cache.values()) + logits.nbytes


def budget_batch_size(model: HookedTransformer, data, per_pass: int, memory_budget: float) -> int:
    """The largest batch whose scan stays within ``memory_budget`` GiB of activations, by an upper
    bound on what the scans hold.

    A pass holds ``batch * per_pass`` rows (``row_bytes`` each, at the longest item's length,
    logits included), and each batch item's cached runs are counted as a residual stream and a
    ``z`` at every layer, twice (clean and corrupt): more than any scan keeps (ablation caches no
    corrupt run, path patching two residual streams). The batch is at least 1 and at most the
    number of items.
    """
    if not memory_budget > 0:
        raise InputError(f"memory_budget={memory_budget}; give the GiB the scan may use (> 0)")
    cfg = model.cfg
    n_pos = max(len(ids) for ids in data["input_ids"])
    itemsize = torch.empty((), dtype=cfg.dtype).element_size()
    kept = 2 * cfg.n_layers * n_pos * (cfg.d_model + cfg.n_heads * cfg.d_head) * itemsize
    per_item = per_pass * row_bytes(model, n_pos) + kept
    return int(max(1, min(len(data), memory_budget * 2**30 // per_item)))


def check_items(data, position: str | None, metric: str = "prob") -> None:
    """Refuse items a scan cannot read: none, no ``position`` column, no rival for a logit
    difference (``metrics.check_metric``)."""
    metrics.check_metric(metric, data)
    if len(data) == 0:
        raise InputError("patching needs at least one item; the dataset is empty")
    if position is not None and position not in data.column_names:
        raise InputError(f"the data has no position column {position!r}; "
                         f"it has {data.column_names}")


# --------------------------------------------------------------------------------------------------
# What the slow twins of the patching scans share: items one at a time, and per-head sums.


class OneItem(NamedTuple):
    """One item as a slow twin reads it: a batch of one, unpadded, with its clean and corrupt
    runs."""

    ids: Int[Tensor, "1 pos"]
    target: Target  # its answer (and rival)
    last: Int[Tensor, " 1"]
    at: slice | int  # the item's position column, or every position
    clean: dict  # hook_z name -> the clean run's z
    corrupt: dict  # hook_z name -> the corrupt run's z
    p_clean: float  # the clean run's value of the metric
    p_corrupt: float  # the corrupt run's


def one_item_runs(model: HookedTransformer, data, position: str | None,
                  metric: str = "prob") -> Iterator[OneItem]:
    """Each item of ``data`` with its clean and corrupt ``z`` of every layer and the metric's
    value on both, unbatched and unpadded, for the slow twins; the fast scans never use it.
    ``data`` is checked first."""
    check_items(data, position, metric)
    device = device_of(model)
    names = [hook_z(layer) for layer in range(model.cfg.n_layers)]
    for item in data:
        ids = torch.tensor([item["input_ids"]], device=device)
        target, last = Target.of(item, metric), torch.tensor([item["pos_last"]])
        with torch.no_grad():  # closed before the yield, so the caller's grad mode is its own
            logits, clean = model.run_with_cache(ids, names_filter=names)
            corrupt_ids = torch.tensor([item["corrupt_input_ids"]], device=device)
            corrupt_logits, corrupt = model.run_with_cache(corrupt_ids, names_filter=names)
            p_clean = metrics.measure(logits, target, metric, last)[0].item()
            p_corrupt = metrics.measure(corrupt_logits, target, metric, last)[0].item()
        at = slice(None) if position is None else item[position]
        yield OneItem(ids, target, last, at, clean, corrupt, p_clean, p_corrupt)


class PatchSums:
    """Per-head sums over items of a patch's change of the metric (``cdist.discovery.metrics``):
    the per-item score (the change relative to the clean value for ``"prob"``, the change itself
    for a logit difference), the change and the score squared; and the items' clean and corrupt
    values, whose mean gap normalises ``"logit_diff_normalised"``. ``scan`` turns them into a
    patching ``Scan``, NaN for heads never added."""

    def __init__(self, model: HookedTransformer, metric: str = "prob"):
        metrics.check_metric(metric)
        self.metric = metric
        self.shape = (model.cfg.n_layers, model.cfg.n_heads)
        n = self.shape[0] * self.shape[1]
        self.rel, self.diff, self.rel_sq = (torch.zeros(n, dtype=torch.float64) for _ in range(3))
        self.scanned = torch.zeros(n, dtype=torch.bool)
        self.gap = torch.zeros(1, dtype=torch.float64)  # sum over items of clean - corrupt

    def state(self) -> dict[str, Tensor]:
        """The sums by name, as tensors that adding to them changes (``RunningSums`` keeps a
        scan's between batches: a batch's ``state`` added to the total is the total it would
        have reached, bit for bit, since each head is added once per batch)."""
        return {"rel": self.rel, "diff": self.diff, "rel_sq": self.rel_sq,
                "scanned": self.scanned, "gap": self.gap}

    def load_state(self, state: dict[str, Tensor]) -> None:
        """Take over ``state``'s sums (a ``state`` of the same model's sums)."""
        self.rel, self.diff, self.rel_sq = state["rel"], state["diff"], state["rel_sq"]
        self.scanned, self.gap = state["scanned"], state["gap"]

    def add_batch(self, heads: Int[Tensor, " k"], change: Float[Tensor, "k batch"],
                  base: Float[Tensor, " batch"]) -> None:
        """Add a batch: ``change[j, i]`` is head ``heads[j]``'s (flat index) change on item ``i``,
        whose clean value is ``base[i]``."""
        change = change.double().cpu()
        rel = change / base.double().cpu()[None, :] if self.metric == "prob" else change
        heads = heads.cpu()
        self.rel[heads] += rel.sum(1)
        self.diff[heads] += change.sum(1)
        self.rel_sq[heads] += (rel**2).sum(1)
        self.scanned[heads] = True

    def add_gap(self, clean: Float[Tensor, " batch"], corrupt: Float[Tensor, " batch"]) -> None:
        """Add a batch of items' clean and corrupt values (once per item, whatever the heads)."""
        self.gap += (clean.double().cpu() - corrupt.double().cpu()).sum()

    def add_layer(self, layer: int, change: Float[Tensor, "batch head_index"],
                  base: Float[Tensor, " batch"]) -> None:
        """Add a batch of every head of one layer: ``change[i, h]`` is head ``h``'s change on item
        ``i``."""
        self.add_batch(layer * self.shape[1] + torch.arange(self.shape[1]), change.T, base)

    def add_unreachable(self, heads: Int[Tensor, " k"]) -> None:
        """Mark heads that cannot change the answer (senders at or above every receiver) as
        measured, with no change."""
        self.scanned[heads.cpu()] = True

    def add(self, layer: int, head: int, change: float, base: float) -> None:
        """Add one head's change on one item (the slow twins)."""
        self.add_batch(torch.tensor([layer * self.shape[1] + head]),
                       torch.tensor([[change]]), torch.tensor([base]))

    def add_other_ranks(self) -> None:
        """Add every other rank's sums into this rank's (each rank having added only its share of
        the heads, ``rank_heads``), so that every rank holds the whole scan; nothing with one
        process. Every rank must call it. Every rank sees every item, so the gap is its own."""
        *sums, scanned = sum_over_ranks(self.rel, self.diff, self.rel_sq, self.scanned.double())
        self.rel, self.diff, self.rel_sq = sums
        self.scanned = scanned > 0

    def scan(self, method: str, n: int, **where) -> Scan:
        """The ``Scan`` over ``n`` items.

        Raises:
            InputError: ``"logit_diff_normalised"`` on items whose corrupt prompts do not lower
                the logit difference on average: there is nothing to normalise by.
        """
        gap = float(self.gap) / n
        if self.metric == "logit_diff_normalised":
            metrics.check_gap(gap, n)
        nan = torch.where(self.scanned, 0.0, torch.nan)
        return patch_scan(method, self.rel + nan, self.diff + nan, n, self.shape,
                          self.rel_sq + nan, metric=self.metric, gap=gap, **where)
