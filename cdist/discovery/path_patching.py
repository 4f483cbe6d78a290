"""Path patching of attention heads (Wang et al. 2022, "Interpretability in the Wild";
Goldowsky-Dill et al. 2023), as Prakash et al. 2024 use it to find the entity-tracking circuit.

Path patching moves a head's output ``z`` (``cdist.models.hook_z``) from a *corrupt* prompt into the
run on a *clean* prompt and measures how much the probability of the clean answer at ``pos_last``
changes, counting only the effect that travels *directly* from one sender head to chosen receivers.
A task dataset pairs each prompt with its counterfactual (``corrupt_input_ids``: for entity tracking
an example whose query label is absent from its context); the two are aligned token for token, so
``z`` moves position by position. Two runs per sender:

1. On the clean prompt, the sender's ``z`` at ``position`` comes from the corrupt run and every
   other head's ``z``, at every position and layer, is frozen to its clean value; MLPs and norms
   recompute. The sender's change therefore reaches later layers only through the residual stream
   and the MLPs.
2. If the receivers are the logits, run 1's answer probability is the result. If they are heads,
   run 1's values of the receivers' query (``"q"``), key (``"k"``) or value (``"v"``) input at
   ``position`` are written into an otherwise ordinary clean run, and its answer probability is
   the result.

Under grouped-query attention keys and values belong to key/value heads, each shared by a group of
query heads: a ``"k"`` or ``"v"`` receiver is the *key/value group* of the receiver head
(``Head.kv_head``), so patching it changes the inputs of every query head of that group. ``"q"``
receivers are query heads. Senders at or above the last receiver's layer cannot reach any receiver;
they are not run and score 0.

Where the speed comes from (each exact, each checked against ``path_patching_scan_reference``):
- Batching: a pass stacks copies of a batch of prompts, copy ``j`` patching sender ``j``
  (``cdist.discovery.engine``).
- Run 1 is computed at ``position`` alone. With every head's ``z`` frozen nothing moves between
  positions, so one position's residual stream depends only on its embedding, the given ``z`` and
  its own MLPs (``cdist.models.frozen_head_residuals``): no attention and no other position is
  computed.
- Run 2 starts at the lowest receiver's layer from the clean run's cached residual stream, and only
  ``pos_last`` is unembedded.
- Under ``torchrun`` each rank runs only its share of the senders (``engine.rank_heads``), and the
  ranks add up their sums.

Scores, per head, averaged over the examples, by default: ``relative_change`` = (p_patched -
p_clean) / p_clean, Prakash et al.'s path-patching score (most negative = most important), and
``prob_change`` = p_patched - p_clean; a logit difference instead with ``metric``
(``cdist.discovery.metrics``).

The search that chains these scans backwards from the logits, group by group, is
``cdist.discovery.search``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from jaxtyping import Bool
from torch import Tensor

from cdist.discovery import metrics
from cdist.discovery.engine import (
    OneItem,
    PatchSums,
    budget_batch_size,
    check_items,
    flat_heads,
    one_head_variants,
    one_item_runs,
    rank_heads,
    replacing,
)
from cdist.discovery.metrics import Target
from cdist.discovery.resume import RunningSums, scan_key
from cdist.distributed import is_main
from cdist.errors import InputError
from cdist.evaluate import batches, device_of, pad_id
from cdist.models import (
    HookedTransformer,
    attention_inputs,
    frozen_head_residuals,
    hook_input,
    hook_resid_pre,
    hook_z,
    unembed,
)
from cdist.types import Head, Scan

__all__ = [
    "ReceiverInput",
    "path_patched_value",
    "path_patching_scan",
    "path_patching_scan_reference",
    "receiver_masks",
    "reference_path_scan",
]

ReceiverInput = Literal["q", "k", "v"]


# --------------------------------------------------------------------------------------------------
# The scan
# --------------------------------------------------------------------------------------------------


def receiver_masks(
    receivers: Sequence[Head], receiver_input: ReceiverInput, cfg
) -> dict[tuple[int, str], Bool[Tensor, " idx"]]:
    """(layer, receiver input hook name) -> mask over that hook's head axis
    (query or key/value heads).
    """
    if receiver_input not in ("q", "k", "v"):
        raise InputError(f"receiver_input={receiver_input!r}; choose 'q', 'k' or 'v'")
    n_kv = cfg.n_key_value_heads or cfg.n_heads
    width = cfg.n_heads if receiver_input == "q" else n_kv
    out: dict[tuple[int, str], Tensor] = {}
    for r in receivers:
        if r.layer >= cfg.n_layers or r.head >= cfg.n_heads:
            raise InputError(f"receiver {r} does not exist in a model of {cfg.n_layers} layers x "
                             f"{cfg.n_heads} heads")
        name = hook_input(r.layer, receiver_input)
        index = r.head if receiver_input == "q" else r.kv_head(cfg.n_heads, n_kv)
        out.setdefault((r.layer, name), torch.zeros(width, dtype=torch.bool))[index] = True
    return out


@torch.no_grad()
def path_patching_scan(
    model: HookedTransformer,
    data,
    *,
    receivers: Sequence[Head] = (),
    receiver_input: ReceiverInput = "q",
    position: str = "pos_last",
    batch_size: int = 16,
    senders_per_pass: int = 8,
    memory_budget: float | None = None,
    senders: Sequence[Head | str] | None = None,
    metric: str = "prob",
    progress: bool = False,
    resume: str | Path | None = None,
) -> Scan:
    """Path-patch every head, as a sender at ``position``, into the logits or into ``receivers``.

    Batched: a forward pass stacks ``senders_per_pass`` copies of a batch of prompts, copy ``j``
    patching sender ``j``. ``path_patching_scan_reference`` is the one-sender-one-prompt twin.
    Under ``torchrun`` each rank patches its share of the senders and every rank returns the whole
    scan (every rank must call it).

    Args:
        model: a HookedTransformer.
        data: a task dataset with ``input_ids``, ``corrupt_input_ids``, ``answer_id``, ``pos_last``
            and ``position``.
        receivers: receiver heads; empty means the logits (Value Fetchers' receivers).
        receiver_input: which input of the receivers carries the path: ``"q"``, ``"k"`` or ``"v"``
            (the latter two as key/value groups under GQA).
        position: position column where the sender is patched and the receivers' input is replaced.
        batch_size: prompts per batch; a pass holds ``batch_size * senders_per_pass`` rows.
        memory_budget: GiB of activations the scan may hold; if given, it replaces
            ``batch_size`` (``engine.budget_batch_size``).
        senders_per_pass: senders per forward pass.
        senders: the senders to patch (e.g. ``path_attribution_scan``'s top candidates); default
            every head. The others score NaN, except those at or above the last receiver's layer,
            which cannot reach a receiver and score 0.
        metric: what is read at the answer (``cdist.discovery.metrics``).
        progress: show a tqdm bar over forward passes (rank 0's, under ``torchrun``).
        resume: a file for the running sums after each batch (``RunningSums``, which says when
            a killed scan resumes from it, bit for bit); removed when the scan returns.

    Returns:
        A ``Scan`` (method "path_patching", ranked by the metric's score, most negative first;
        for ``"prob"`` ``relative_change``, ``prob_change`` and ``relative_change_se``):
        ``[layer, head_index]`` float32 CPU tensors (module doc).
    """
    check_items(data, position, metric)
    if memory_budget is not None:
        batch_size = budget_batch_size(model, data, senders_per_pass, memory_budget)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    paths = _Paths.of(model, receivers, receiver_input, position)
    asked = flat_heads(senders, n_layers, n_heads)
    run = rank_heads(asked[asked < paths.top * n_heads])  # flat index layer * n_heads + head
    columns = metrics.columns(position, metric)
    key = None if resume is None else scan_key(
        "path_patching", model, data, ["corrupt_input_ids", *columns], paths=paths.key(),
        senders=asked.tolist(), batch_size=batch_size, senders_per_pass=senders_per_pass,
        metric=metric)
    running = RunningSums(resume, key, **PatchSums(model, metric).state())
    per_batch = -(-len(run) // senders_per_pass)
    with running.bar("path patching", -(-len(data) // batch_size), per_batch,
                     progress and is_main()) as bar:
        # the batches summed before a kill were checked by the run that summed them
        for batch in running.pending(batches(data, batch_size, pad_id(model), columns,
                                             corrupt=True)):
            if not paths.receivers and not torch.equal(batch[position], batch["pos_last"]):
                raise InputError("receivers=() means the logits at pos_last; "
                                 f"position={position!r} differs")
            running.add(**_batch_sums(model, batch, paths, run, senders_per_pass, metric,
                                      bar.update).state())
    sums = PatchSums(model, metric)
    sums.load_state(running.sums)
    sums.add_unreachable(asked[asked >= paths.top * n_heads])
    sums.add_other_ranks()
    running.finish()
    return sums.scan("path_patching", len(data), position=position, receivers=paths.receivers,
                     receiver_input=receiver_input if paths.receivers else None)


@dataclass(frozen=True)
class _Paths:
    """What every batch of a path-patching scan shares: the receivers and how they are reached.

    Attributes:
        receivers: the receiver heads, sorted (empty: the logits).
        receiver_input: which of their inputs carries the path.
        position: the position column where senders are patched and receivers' inputs replaced.
        in_masks: ``receiver_masks`` of the receivers.
        top: senders must sit below this layer, the last receiver's (``n_layers`` for the logits).
        start: run 2 is the clean run below this layer, the first receiver's (0 for the logits).
    """

    receivers: tuple[Head, ...]
    receiver_input: ReceiverInput
    position: str
    in_masks: dict[tuple[int, str], Tensor]
    top: int
    start: int

    def key(self) -> dict:
        """What the paths are, for a scan's resume key (``RunningSums``)."""
        return {"receivers": [str(r) for r in self.receivers],
                "receiver_input": self.receiver_input, "position": self.position}

    @classmethod
    def of(cls, model: HookedTransformer, receivers: Sequence[Head],
           receiver_input: ReceiverInput, position: str) -> _Paths:
        receivers = tuple(sorted(set(receivers)))
        in_masks = receiver_masks(receivers, receiver_input, model.cfg)
        top = max(r.layer for r in receivers) if receivers else model.cfg.n_layers
        start = min(r.layer for r in receivers) if receivers else 0
        return cls(receivers, receiver_input, position, in_masks, top, start)


def _batch_sums(model: HookedTransformer, batch: dict, paths: _Paths, run: Tensor,
                senders_per_pass: int, metric: str, on_pass: Callable[[], object]) -> PatchSums:
    """One batch's sums, each of this rank's senders once: added to the scan's, they give what
    adding each pass to the scan's would have, bit for bit."""
    part = PatchSums(model, metric)
    for chunk, change, p_clean in _patched_chunks(model, batch, paths, run, senders_per_pass,
                                                  metric, part):
        part.add_batch(chunk, change, p_clean)
        on_pass()
    return part


def _patched_chunks(
    model: HookedTransformer, batch: dict, paths: _Paths, run: Tensor, senders_per_pass: int,
    metric: str, sums: PatchSums,
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Path-patch one batch, ``senders_per_pass`` of this rank's senders ``run`` per pass; the
    batch's clean and corrupt values go to ``sums``'s gap.

    Yields, per pass: its senders (flat indices), the change of each copy's value of the metric
    (``[senders, rows]``) and the clean value (``[rows]``).
    """
    device = device_of(model)
    names = [hook_z(layer) for layer in range(paths.top)]
    resid_names = sorted({hook_resid_pre(0), hook_resid_pre(paths.start)})
    ids, n_rows = batch["input_ids"].to(device), len(batch["input_ids"])
    rows = torch.arange(n_rows, device=device)
    here = batch[paths.position].to(device)
    target = Target.of(batch, metric)
    logits, clean = model.run_with_cache(ids, names_filter=names + resid_names)
    p_clean, _ = metrics.measure(logits, target, metric, batch["pos_last"])
    corrupt_logits, corrupt = model.run_with_cache(batch["corrupt_input_ids"].to(device),
                                                   names_filter=names)
    sums.add_gap(p_clean, metrics.measure(corrupt_logits, target, metric, batch["pos_last"])[0])
    # [batch, head_index, d_head] at ``position``
    clean_z = [clean[name][rows, here] for name in names]
    corrupt_z = [corrupt[name][rows, here] for name in names]
    embed = clean[hook_resid_pre(0)][rows, here]
    for chunk in run.split(senders_per_pass) if len(run) else ():  # a rank may have none
        n_copies = len(chunk)
        resid = _frozen_run(model, chunk, clean_z, corrupt_z, embed)
        if not paths.receivers:
            final = resid[-1]  # already at pos_last
        else:
            final = _receiving_run(model, batch, paths, clean[hook_resid_pre(paths.start)], resid,
                                   n_copies)
        p, _ = metrics.measure(unembed(model, final), target.repeat(n_copies), metric)
        yield chunk, p.view(n_copies, n_rows) - p_clean[None, :], p_clean


def _frozen_run(model: HookedTransformer, chunk: Tensor, clean_z: list[Tensor],
                corrupt_z: list[Tensor], embed: Tensor) -> list[Tensor]:
    """Run 1, at ``position`` only (``cdist.models.frozen_head_residuals``), for one copy of the
    batch per sender of ``chunk``: every head frozen to its clean ``z``, copy ``j``'s sender taken
    from the corrupt run, MLPs recomputed. Returns the residual stream entering each layer."""
    n_copies, n_rows, device = len(chunk), len(embed), device_of(model)
    variants = one_head_variants(chunk, model.cfg.n_heads, n_rows)
    z = []
    for layer in range(len(clean_z)):
        frozen = clean_z[layer].repeat(n_copies, 1, 1)
        if layer in variants:
            mask = variants[layer].to(device)[:, :, None]
            frozen = torch.where(mask, corrupt_z[layer].repeat(n_copies, 1, 1), frozen)
        z.append(frozen)
    return frozen_head_residuals(model, embed.repeat(n_copies, 1), z)


def _receiving_run(model: HookedTransformer, batch: dict, paths: _Paths, clean_resid: Tensor,
                   resid: list[Tensor], n_copies: int) -> Tensor:
    """Run 2: an ordinary clean run from ``paths.start`` (``clean_resid``, the clean residual
    stream there) whose receivers read run 1's inputs at ``position``; the final residual stream
    at each row's ``pos_last``."""
    device = device_of(model)
    at = batch[paths.position].repeat(n_copies)
    hooks = []
    for (layer, name), mask in paths.in_masks.items():
        new = attention_inputs(model, layer, resid[layer])[paths.receiver_input][:, None]
        hooks.append((name, replacing(mask, new, at)))
    with model.hooks(fwd_hooks=hooks):
        final = model(clean_resid.repeat(n_copies, 1, 1), start_at_layer=paths.start,
                      stop_at_layer=model.cfg.n_layers)
    last = batch["pos_last"].repeat(n_copies).to(device)
    return final[torch.arange(len(final), device=device), last]


def path_patched_value(model: HookedTransformer, run: OneItem, layer: int, head: int,
                       sender_z: Tensor, in_masks: dict, metric: str = "prob") -> Tensor:
    """One item's value of ``metric`` (by default the answer's probability) when sender
    ``(layer, head)``'s ``z`` at the item's position is ``sender_z`` and every other head is frozen
    to its clean ``z`` (run 1), read by the receivers of ``in_masks`` (run 2) or directly by the
    logits; plain full forward passes, differentiable in ``sender_z``. The slow twins' one step."""
    names = [hook_z(layer) for layer in range(model.cfg.n_layers)]

    def freeze(z, hook):
        z = run.clean[hook.name].clone()
        if hook.layer() == layer:
            z[0, run.at, head] = sender_z
        return z

    freeze_all = [(name, freeze) for name in names]
    if not in_masks:
        with model.hooks(fwd_hooks=freeze_all):
            logits = model(run.ids)
    else:
        run1: dict[str, Tensor] = {}

        def keep(x, hook):
            run1[hook.name] = x
            return x

        with model.hooks(fwd_hooks=freeze_all + [(name, keep) for _, name in in_masks]):
            model(run.ids)

        def receive(x, hook):
            x = x.clone()
            idx = in_masks[(hook.layer(), hook.name)].nonzero()[:, 0]
            x[0, run.at, idx] = run1[hook.name][0, run.at, idx]
            return x

        with model.hooks(fwd_hooks=[(name, receive) for _, name in in_masks]):
            logits = model(run.ids)
    return metrics.measure(logits, run.target, metric, run.last)[0].sum()


def reference_path_scan(model: HookedTransformer, data, receivers: Sequence[Head],
                        receiver_input: ReceiverInput, position: str, method: str,
                        change: Callable[[OneItem, int, int, dict], float],
                        metric: str = "prob") -> Scan:
    """The slow twins' loop: every item, every sender below the last receiver's layer, one at a
    time; ``change(run, layer, head, in_masks)`` is one sender's change on one item."""
    cfg = model.cfg
    receivers = tuple(sorted(set(receivers)))
    in_masks = receiver_masks(receivers, receiver_input, cfg)
    top = max(r.layer for r in receivers) if receivers else cfg.n_layers
    sums = PatchSums(model, metric)
    sums.add_unreachable(torch.arange(top * cfg.n_heads, cfg.n_layers * cfg.n_heads))
    for run in one_item_runs(model, data, position, metric):
        sums.add_gap(torch.tensor([run.p_clean]), torch.tensor([run.p_corrupt]))
        for layer in range(top):
            for head in range(cfg.n_heads):
                sums.add(layer, head, change(run, layer, head, in_masks), run.p_clean)
    return sums.scan(method, len(data), position=position, receivers=receivers,
                     receiver_input=receiver_input if receivers else None)


@torch.no_grad()
def path_patching_scan_reference(
    model: HookedTransformer,
    data,
    *,
    receivers: Sequence[Head] = (),
    receiver_input: ReceiverInput = "q",
    position: str = "pos_last",
    metric: str = "prob",
) -> Scan:
    """The slow twin of ``path_patching_scan``: one sender, one unpadded prompt,
    full forward passes.

    It freezes and patches by plain indexing and never stops early, so it shares with the fast path
    only the model and the receiver bookkeeping. A test oracle; use ``path_patching_scan`` for real
    work.
    """

    def change(run, layer, head, in_masks):
        corrupt = run.corrupt[hook_z(layer)][0, run.at, head]
        return (path_patched_value(model, run, layer, head, corrupt, in_masks, metric).item()
                - run.p_clean)

    return reference_path_scan(model, data, receivers, receiver_input, position, "path_patching",
                               change, metric)
