"""Path patching, activation patching and attribution patching of attention heads.

All three move a head's output ``z`` (``blocks.{l}.attn.hook_z``) from a *corrupt* prompt into the run on a
*clean* prompt and measure how much the probability of the clean answer at ``pos_last`` changes. A task
dataset pairs each prompt with its counterfactual (``corrupt_input_ids``: for entity tracking an example whose
query label is absent from its context); the two are aligned token for token, so ``z`` moves position by
position.

- **Activation patching** (``activation_patching_scan``): one head's ``z`` comes from the corrupt run; the
  rest of the network recomputes. The head's *total* effect.
- **Path patching** (``path_patching_scan``, Wang et al. 2022 as used by Prakash et al. 2024): the effect of
  one sender head that travels *directly* to chosen receivers. Two runs per sender:

  1. On the clean prompt, the sender's ``z`` at ``position`` comes from the corrupt run and every other
     head's ``z``, at every position and layer, is frozen to its clean value; MLPs and norms recompute. The
     sender's change therefore reaches later layers only through the residual stream and the MLPs.
  2. If the receivers are the logits, run 1's answer probability is the result. If they are heads, run 1's
     values of the receivers' query (``"q"``), key (``"k"``) or value (``"v"``) input at ``position`` are
     written into an otherwise ordinary clean run, and its answer probability is the result.

  Under grouped-query attention keys and values belong to key/value heads, each shared by a group of query
  heads: a ``"k"`` or ``"v"`` receiver is the *key/value group* of the receiver head (``Head.kv_head``), so
  patching it changes the inputs of every query head of that group. ``"q"`` receivers are query heads.
  Senders at or above the last receiver's layer cannot reach any receiver; they are not run and score 0.
- **Attribution patching** (``attribution_patching_scan``, Nanda 2023): the first-order Taylor estimate of
  activation patching, ``(z_corrupt - z_clean) . d p / d z``, for every head from one forward and one
  backward pass; a fast pre-filter whose rank agreement with the exact scan is measured, not assumed.

Where the speed comes from (each exact, each checked against the slow twins):
- Batching: a pass stacks copies of a batch of prompts, copy ``j`` patching sender (or head) ``j``.
- Path patching's run 1 is computed at ``position`` alone. With every head's ``z`` frozen nothing moves
  between positions, so one position's residual stream depends only on its embedding, the given ``z`` and
  its own MLPs (``cdist.models.frozen_head_residuals``): no attention and no other position is computed.
- A pass starts at the first layer it changes (the sender's layer for activation patching, the lowest
  receiver's layer for path patching's run 2) from the clean run's cached residual stream, and only
  ``pos_last`` is unembedded.

Scores, per head, averaged over the examples: ``relative_change`` = (p_patched - p_clean) / p_clean, Prakash
et al.'s path-patching score (most negative = most important), and ``prob_change`` = p_patched - p_clean.

``entity_tracking_circuit`` runs Prakash et al.'s backward search (Value Fetchers -> Position Transmitters ->
Position Detectors -> Structure Readers) and returns a ``Circuit``. Every fast function has a slow,
one-sender-one-prompt-at-a-time twin (``*_reference``) that the tests hold it to.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Bool
from torch import Tensor
from tqdm.auto import tqdm

from cdist.ablation import one_head_scan, one_head_variants, replace_heads
from cdist.evaluate import answer_stats, batches, device_of, pad_id
from cdist.models import attention_inputs, frozen_head_residuals, unembed
from cdist.types import Circuit, Head, HeadScores

__all__ = [
    "ET_SEARCH",
    "ET_SEARCH_ADJACENT",
    "SearchStep",
    "activation_patching_scan",
    "activation_patching_scan_reference",
    "attribution_patching_scan",
    "entity_tracking_circuit",
    "path_patching_scan",
    "path_patching_scan_reference",
    "ranked_circuit",
    "select_heads",
]

ReceiverInput = Literal["q", "k", "v"]


# ---------------------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------------------


def _z_names(n_layers: int) -> list[str]:
    return [Head(layer, 0).hook_z for layer in range(n_layers)]


def _receiver_hooks(receivers: Sequence[Head], receiver_input: ReceiverInput, cfg) -> dict[str, Bool[Tensor, " idx"]]:
    """Receiver input hook name -> mask over that hook's head axis (query heads, or key/value heads)."""
    if receiver_input not in ("q", "k", "v"):
        raise ValueError(f"receiver_input={receiver_input!r}; choose 'q', 'k' or 'v'")
    n_kv = cfg.n_key_value_heads or cfg.n_heads
    width = cfg.n_heads if receiver_input == "q" else n_kv
    out: dict[str, Tensor] = {}
    for r in receivers:
        if r.layer >= cfg.n_layers or r.head >= cfg.n_heads:
            raise ValueError(f"receiver {r} does not exist in a model of {cfg.n_layers} layers x {cfg.n_heads} heads")
        name = getattr(r, f"hook_{receiver_input}")
        index = r.head if receiver_input == "q" else r.kv_head(cfg.n_heads, n_kv)
        out.setdefault(name, torch.zeros(width, dtype=torch.bool))[index] = True
    return out


def _replacing(heads: Tensor, source: Tensor, positions: Tensor | None) -> Callable:
    """A hook that writes ``source`` into the chosen heads (and positions) of its activation."""
    return lambda x, hook: replace_heads(x, heads, source, positions)


def _scores(total_rel: Tensor, total_diff: Tensor, n: int, n_layers: int, n_heads: int, metric: str) -> dict:
    rel = (total_rel / n).reshape(n_layers, n_heads).float()
    diff = (total_diff / n).reshape(n_layers, n_heads).float()
    return {"relative_change": rel, "prob_change": diff, "metric": metric}


def _check(data, position: str | None) -> None:
    if len(data) == 0:
        raise ValueError("patching needs at least one item; the dataset is empty")
    if position is not None and position not in data.column_names:
        raise ValueError(f"the data has no position column {position!r}; it has {data.column_names}")


# ---------------------------------------------------------------------------------------------------------
# Path patching
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def path_patching_scan(
    model,
    data,
    *,
    receivers: Sequence[Head] = (),
    receiver_input: ReceiverInput = "q",
    position: str = "pos_last",
    batch_size: int = 16,
    senders_per_pass: int = 8,
    progress: bool = False,
) -> dict:
    """Path-patch every head, as a sender at ``position``, into the logits or into ``receivers``.

    Batched: a forward pass stacks ``senders_per_pass`` copies of a batch of prompts, copy ``j`` patching
    sender ``j``. ``path_patching_scan_reference`` is the one-sender-one-prompt twin.

    Args:
        model: a HookedTransformer.
        data: a task dataset with ``input_ids``, ``corrupt_input_ids``, ``answer_id``, ``pos_last`` and
            ``position``.
        receivers: receiver heads; empty means the logits (Value Fetchers' receivers).
        receiver_input: which input of the receivers carries the path: ``"q"``, ``"k"`` or ``"v"`` (the
            latter two as key/value groups under GQA).
        position: position column where the sender is patched and the receivers' input is replaced.
        batch_size: prompts per batch; a pass holds ``batch_size * senders_per_pass`` rows.
        senders_per_pass: senders per forward pass.
        progress: show a tqdm bar over batches.

    Returns:
        ``relative_change`` and ``prob_change``: ``[layer, head_index]`` float32 CPU tensors (module doc),
        and ``metric``.
    """
    _check(data, position)
    cfg, device = model.cfg, device_of(model)
    n_layers, n_heads = cfg.n_layers, cfg.n_heads
    receivers = tuple(sorted(set(receivers)))
    in_masks = _receiver_hooks(receivers, receiver_input, cfg)
    top = max(r.layer for r in receivers) if receivers else n_layers  # senders must sit below a receiver
    senders = torch.arange(top * n_heads)  # flat index layer * n_heads + head
    rel = torch.zeros(n_layers * n_heads, dtype=torch.float64)
    diff = torch.zeros(n_layers * n_heads, dtype=torch.float64)
    names = _z_names(top)
    start = min(r.layer for r in receivers) if receivers else 0  # run 2 is the clean run below this layer
    resid_names = sorted({"blocks.0.hook_resid_pre", f"blocks.{start}.hook_resid_pre"})
    total = -(-len(data) // batch_size)
    for batch in tqdm(batches(data, batch_size, pad_id(model), (position,), corrupt=True), total=total,
                      disable=not progress, desc="path patching"):
        if not receivers and not torch.equal(batch[position], batch["pos_last"]):
            raise ValueError(f"receivers=() means the logits at pos_last; position={position!r} differs")
        ids, n_rows = batch["input_ids"].to(device), len(batch["input_ids"])
        rows = torch.arange(n_rows, device=device)
        here = batch[position].to(device)
        logits, clean = model.run_with_cache(ids, names_filter=names + resid_names)
        p_clean, _ = answer_stats(logits, batch["answer_id"], batch["pos_last"])
        _, corrupt = model.run_with_cache(batch["corrupt_input_ids"].to(device), names_filter=names)
        clean_z = [clean[name][rows, here] for name in names]  # [batch, head_index, d_head] at ``position``
        corrupt_z = [corrupt[name][rows, here] for name in names]
        embed = clean["blocks.0.hook_resid_pre"][rows, here]
        for chunk in senders.split(senders_per_pass):
            n_copies = len(chunk)
            at = batch[position].repeat(n_copies)
            variants = one_head_variants(chunk, n_heads, n_rows)
            # Run 1, at ``position`` only (cdist.models.frozen_head_residuals): every head frozen to its clean
            # z, copy j's sender taken from the corrupt run, MLPs recomputed.
            z = []
            for layer in range(top):
                frozen = clean_z[layer].repeat(n_copies, 1, 1)
                if layer in variants:
                    mask = variants[layer].to(device)[:, :, None]
                    frozen = torch.where(mask, corrupt_z[layer].repeat(n_copies, 1, 1), frozen)
                z.append(frozen)
            resid = frozen_head_residuals(model, embed.repeat(n_copies, 1), z)
            if not receivers:
                final = resid[-1]  # already at pos_last
            else:
                # Run 2: an ordinary clean run whose receivers read run 1's inputs at ``position``.
                hooks = []
                for name, mask in in_masks.items():
                    layer = int(name.split(".")[1])
                    new = attention_inputs(model, layer, resid[layer])[receiver_input][:, None]
                    hooks.append((name, _replacing(mask, new, at)))
                with model.hooks(fwd_hooks=hooks):
                    final = model(clean[f"blocks.{start}.hook_resid_pre"].repeat(n_copies, 1, 1),
                                  start_at_layer=start, stop_at_layer=n_layers)
                final = final[torch.arange(len(final), device=device), batch["pos_last"].repeat(n_copies).to(device)]
            p, _ = answer_stats(unembed(model, final), batch["answer_id"].repeat(n_copies))
            p, base = p.view(n_copies, n_rows), p_clean[None, :]
            rel[chunk] += ((p - base) / base).sum(1)
            diff[chunk] += (p - base).sum(1)
    return _scores(rel, diff, len(data), n_layers, n_heads, "path_patching")


@torch.no_grad()
def path_patching_scan_reference(
    model,
    data,
    *,
    receivers: Sequence[Head] = (),
    receiver_input: ReceiverInput = "q",
    position: str = "pos_last",
) -> dict:
    """The slow twin of ``path_patching_scan``: one sender, one unpadded prompt, full forward passes.

    It freezes and patches by plain indexing and never stops early, so it shares with the fast path only
    the model and the receiver bookkeeping. A test oracle; use ``path_patching_scan`` for real work.
    """
    _check(data, position)
    cfg, device = model.cfg, device_of(model)
    n_layers, n_heads = cfg.n_layers, cfg.n_heads
    receivers = tuple(sorted(set(receivers)))
    in_masks = _receiver_hooks(receivers, receiver_input, cfg)
    top = max(r.layer for r in receivers) if receivers else n_layers
    rel = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    diff = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    names = _z_names(n_layers)
    for item in data:
        ids = torch.tensor([item["input_ids"]], device=device)
        answer, last, at = torch.tensor([item["answer_id"]]), torch.tensor([item["pos_last"]]), item[position]
        logits, clean = model.run_with_cache(ids, names_filter=names)
        p_clean = answer_stats(logits, answer, last)[0].item()
        _, corrupt = model.run_with_cache(torch.tensor([item["corrupt_input_ids"]], device=device),
                                          names_filter=names)
        for layer in range(top):
            for head in range(n_heads):

                def freeze(z, hook, layer=layer, head=head, clean=clean, corrupt=corrupt, at=at):
                    z = clean[hook.name].clone()
                    if hook.layer() == layer:
                        z[0, at, head] = corrupt[hook.name][0, at, head]
                    return z

                freeze_all = [(name, freeze) for name in names]
                if not receivers:
                    with model.hooks(fwd_hooks=freeze_all):
                        logits = model(ids)
                else:
                    with model.hooks(fwd_hooks=freeze_all):
                        _, run1 = model.run_with_cache(ids, names_filter=list(in_masks))

                    def receive(x, hook, run1=run1, at=at):
                        x = x.clone()
                        idx = in_masks[hook.name].nonzero()[:, 0]
                        x[0, at, idx] = run1[hook.name][0, at, idx]
                        return x

                    with model.hooks(fwd_hooks=[(name, receive) for name in in_masks]):
                        logits = model(ids)
                p = answer_stats(logits, answer, last)[0].item()
                rel[layer, head] += (p - p_clean) / p_clean
                diff[layer, head] += p - p_clean
    return _scores(rel.flatten(), diff.flatten(), len(data), n_layers, n_heads, "path_patching")


# ---------------------------------------------------------------------------------------------------------
# Activation patching and its first-order estimate
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def activation_patching_scan(
    model,
    data,
    *,
    position: str | None = None,
    batch_size: int = 32,
    heads_per_pass: int = 8,
    progress: bool = False,
) -> dict:
    """Patch each head's ``z`` from the corrupt run into the clean run, alone, and measure the answer.

    Batched like ``head_ablation_scan`` (copy ``j`` of a stacked batch patches head ``j``).

    Args:
        model: a HookedTransformer.
        data: a task dataset with ``input_ids``, ``corrupt_input_ids``, ``answer_id``, ``pos_last`` (and
            ``position`` if given).
        position: position column to patch at; None patches every position.
        batch_size: prompts per batch.
        heads_per_pass: heads per forward pass.
        progress: show a tqdm bar over batches.

    Returns:
        ``relative_change``, ``prob_change`` (``[layer, head_index]``, float32, CPU) and ``metric``.
    """
    _check(data, position)
    cfg, device = model.cfg, device_of(model)
    n_layers, n_heads = cfg.n_layers, cfg.n_heads
    rel = torch.zeros(n_layers * n_heads, dtype=torch.float64)
    diff = torch.zeros(n_layers * n_heads, dtype=torch.float64)
    names = _z_names(n_layers)
    columns = () if position is None else (position,)
    total = -(-len(data) // batch_size)
    for batch in tqdm(batches(data, batch_size, pad_id(model), columns, corrupt=True), total=total,
                      disable=not progress, desc="activation patching"):
        ids = batch["input_ids"].to(device)
        _, corrupt = model.run_with_cache(batch["corrupt_input_ids"].to(device), names_filter=names)

        def patch(layer, rows, n_copies, batch=batch, corrupt=corrupt):
            at = None if position is None else batch[position].repeat(n_copies)
            return names[layer], _replacing(rows, corrupt[names[layer]].repeat(n_copies, 1, 1, 1), at)

        p_clean, _, p, _ = one_head_scan(model, ids, batch["answer_id"], batch["pos_last"], patch,
                                         heads_per_pass=heads_per_pass)
        base = p_clean[None, :]
        rel += ((p - base) / base).sum(1)
        diff += (p - base).sum(1)
    return _scores(rel, diff, len(data), n_layers, n_heads, "activation_patching")


@torch.no_grad()
def activation_patching_scan_reference(model, data, *, position: str | None = None) -> dict:
    """The slow twin of ``activation_patching_scan``: one head, one unpadded prompt at a time."""
    _check(data, position)
    cfg, device = model.cfg, device_of(model)
    n_layers, n_heads = cfg.n_layers, cfg.n_heads
    rel = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    diff = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    names = _z_names(n_layers)
    for item in data:
        ids = torch.tensor([item["input_ids"]], device=device)
        answer, last = torch.tensor([item["answer_id"]]), torch.tensor([item["pos_last"]])
        at = slice(None) if position is None else item[position]
        p_clean = answer_stats(model(ids), answer, last)[0].item()
        _, corrupt = model.run_with_cache(torch.tensor([item["corrupt_input_ids"]], device=device),
                                          names_filter=names)
        for layer in range(n_layers):
            for head in range(n_heads):

                def patch(z, hook, head=head, corrupt=corrupt, at=at):
                    z = z.clone()
                    z[0, at, head] = corrupt[hook.name][0, at, head]
                    return z

                with model.hooks(fwd_hooks=[(names[layer], patch)]):
                    p = answer_stats(model(ids), answer, last)[0].item()
                rel[layer, head] += (p - p_clean) / p_clean
                diff[layer, head] += p - p_clean
    return _scores(rel.flatten(), diff.flatten(), len(data), n_layers, n_heads, "activation_patching")


def attribution_patching_scan(model, data, *, position: str | None = None, batch_size: int = 32) -> dict:
    """First-order estimate of ``activation_patching_scan`` for every head at once.

    For example i and head h: ``prob_change ~ sum_pos (z_corrupt - z_clean)[i, pos, h] . d p_i / d z[i, pos,
    h]`` (over ``position`` only, if given), and ``relative_change`` = that / p_i. One clean forward and
    backward and one corrupt forward per batch, whatever the number of heads. Parameter gradients are not
    accumulated (only ``z`` is differentiated).
    """
    _check(data, position)
    cfg, device = model.cfg, device_of(model)
    n_layers, n_heads = cfg.n_layers, cfg.n_heads
    rel = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    diff = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    names = _z_names(n_layers)
    columns = () if position is None else (position,)
    for batch in batches(data, batch_size, pad_id(model), columns, corrupt=True):
        ids = batch["input_ids"].to(device)
        with torch.no_grad():
            _, corrupt = model.run_with_cache(batch["corrupt_input_ids"].to(device), names_filter=names)
        clean: dict[str, Tensor] = {}
        probes: dict[str, Tensor] = {}

        def probe(z, hook, clean=clean, probes=probes):
            # z + a zero leaf: d p / d leaf = d p / d z along every downstream path, including those through
            # later heads, whether or not the parameters require gradients (and none accumulate in .grad).
            clean[hook.name] = z.detach()
            probes[hook.name] = torch.zeros_like(z, requires_grad=True)
            return z + probes[hook.name]

        with torch.enable_grad(), model.hooks(fwd_hooks=[(name, probe) for name in names]):
            logits = model(ids)
            rows = torch.arange(len(ids), device=logits.device)
            probs = logits[rows, batch["pos_last"].to(device)].float().softmax(-1)
            p = probs[rows, batch["answer_id"].to(device)]
            grads = torch.autograd.grad(p.sum(), [probes[name] for name in names])
        with torch.no_grad():
            for layer, (name, grad) in enumerate(zip(names, grads, strict=True)):
                delta = (corrupt[name] - clean[name]) * grad  # [batch, pos, head_index, d_head]
                if position is not None:
                    delta = delta[rows, batch[position].to(device)][:, None]
                est = delta.sum((1, 3)).double().cpu()  # [batch, head_index]
                diff[layer] += est.sum(0)
                rel[layer] += (est / p.detach().double().cpu()[:, None]).sum(0)
    return _scores(rel.flatten(), diff.flatten(), len(data), n_layers, n_heads, "attribution_patching")


# ---------------------------------------------------------------------------------------------------------
# From scores to circuits
# ---------------------------------------------------------------------------------------------------------


def select_heads(scores: HeadScores, k: int, min_effect: float = 0.0) -> tuple[Head, ...]:
    """The up-to-``k`` most important heads whose score clears ``min_effect``, most important first.

    For scores where low is important (``higher_is_important=False``, path patching's relative change) a
    head qualifies when its score is at most ``-min_effect``; otherwise when it is at least ``min_effect``.
    With ``min_effect=0`` a head must still move the metric in the important direction (not exactly 0).
    """
    out = []
    for h in scores.top(k):
        s = scores[h]
        ok = s <= -min_effect if not scores.higher_is_important else s >= min_effect
        if ok and s != 0 and s == s:  # s == s drops NaN
            out.append(h)
    return tuple(out)


def ranked_circuit(
    scores: HeadScores, n: int, *, position: str = "pos_last", model: str = "", method: str = "",
    min_effect: float = 0.0,
) -> Circuit:
    """A one-group circuit of the top-``n`` heads of a scan (theory of mind's circuits, students' circuits)."""
    heads = select_heads(scores, n, min_effect)
    return Circuit({"circuit": heads}, positions={"circuit": position}, scores={h: scores[h] for h in heads},
                   model=model, method=method or scores.metric)


@dataclass(frozen=True)
class SearchStep:
    """One group of an iterative path-patching search.

    Attributes:
        name: the group's name.
        position: position column where its senders are patched (and its receivers' input is replaced).
        receivers: the earlier group whose heads receive the path; None means the logits.
        receiver_input: which input of the receivers: "q", "k" or "v" (ignored for the logits).
    """

    name: str
    position: str
    receivers: str | None = None
    receiver_input: ReceiverInput = "q"


# Prakash et al. 2024's search, in order.
ET_SEARCH: tuple[SearchStep, ...] = (
    SearchStep("value_fetcher", "pos_last"),
    SearchStep("position_transmitter", "pos_last", "value_fetcher", "q"),
    SearchStep("position_detector", "pos_query_label", "position_transmitter", "v"),
    SearchStep("structure_reader", "pos_prev_label", "position_detector", "v"),
)
# Our addition for the organisms' adjacent form (" apple F , pen Q . F" -> "apple"): there the value fetchers
# attend to the earlier mention of the queried label, which a head has made carry the object written just
# before it; that head feeds the fetchers' values at ``pos_prev_label``, a path the four groups above never
# test. On et-teacher the four groups alone found only the two fetchers (see README).
ET_SEARCH_ADJACENT: tuple[SearchStep, ...] = (
    *ET_SEARCH,
    SearchStep("object_binder", "pos_prev_label", "value_fetcher", "v"),
)


def entity_tracking_circuit(
    model,
    data,
    *,
    k: int | Mapping[str, int] = 2,
    min_effect: float = 0.0,
    search: Sequence[SearchStep] = ET_SEARCH,
    model_name: str = "",
    batch_size: int = 16,
    senders_per_pass: int = 8,
    progress: bool = False,
) -> tuple[Circuit, dict[str, HeadScores]]:
    """Prakash et al.'s backward path-patching search for the entity-tracking circuit.

    Value Fetchers: senders at ``pos_last`` into the logits. Position Transmitters: senders at ``pos_last``
    into the fetchers' queries. Position Detectors: senders at ``pos_query_label`` into the transmitters'
    values. Structure Readers: senders at ``pos_prev_label`` into the detectors' values (``ET_SEARCH``;
    ``ET_SEARCH_ADJACENT`` adds the organisms' object binders). Each group keeps its top ``k`` heads whose
    relative change is at most ``-min_effect``; a group whose receiver group is empty stays empty.

    Args:
        model: a HookedTransformer.
        data: entity-tracking items (``cdist.tasks.entity_tracking``).
        k: heads per group, one number or group name -> number.
        min_effect: a head's relative change must be at most ``-min_effect`` to be kept.
        search: the steps, in order; each step's receivers must come earlier.
        model_name: recorded in the circuit.
        batch_size, senders_per_pass: as for ``path_patching_scan``.
        progress: show a tqdm bar per group.

    Returns:
        The ``Circuit`` (groups in search order, positions, each head's score in the group that found it
        first) and each searched group's ``HeadScores``.
    """
    groups: dict[str, tuple[Head, ...]] = {}
    found: dict[str, HeadScores] = {}
    scores: dict[Head, float] = {}
    for step in search:
        if step.receivers is not None and step.receivers not in groups:
            raise ValueError(f"search step {step.name!r} receives from {step.receivers!r}, which comes later or "
                             "not at all; order the steps so that receivers come first")
        receivers = groups[step.receivers] if step.receivers is not None else ()
        if step.receivers is not None and not receivers:
            groups[step.name] = ()
            continue
        result = path_patching_scan(model, data, receivers=receivers, receiver_input=step.receiver_input,
                                    position=step.position, batch_size=batch_size,
                                    senders_per_pass=senders_per_pass, progress=progress)
        found[step.name] = HeadScores(result["relative_change"], "relative_change", higher_is_important=False)
        k_here = k if isinstance(k, int) else k.get(step.name, 0)
        groups[step.name] = select_heads(found[step.name], k_here, min_effect)
        for h in groups[step.name]:
            scores.setdefault(h, found[step.name][h])
    circuit = Circuit(groups, positions={step.name: step.position for step in search}, scores=scores,
                      model=model_name, method="path_patching")
    return circuit, found
