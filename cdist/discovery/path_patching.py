"""Path patching of attention heads (Wang et al. 2022, as used by Prakash et al. 2024), and the
entity-tracking circuit search built on it.

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

Scores, per head, averaged over the examples: ``relative_change`` = (p_patched - p_clean) / p_clean,
Prakash et al.'s path-patching score (most negative = most important), and
``prob_change`` = p_patched - p_clean.

``entity_tracking_circuit`` runs Prakash et al.'s backward search (Value Fetchers -> Position
Transmitters -> Position Detectors -> Structure Readers) and returns a ``Circuit``; under
``torchrun`` every rank takes part in each group's scan and reaches the same groups, and rank 0
alone keeps the checkpoint files.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from jaxtyping import Bool
from torch import Tensor
from tqdm.auto import tqdm

from cdist.checkpoints import atomic_write_json
from cdist.discovery.circuits import select_heads
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
from cdist.distributed import barrier, broadcast, is_main
from cdist.errors import InputError
from cdist.evaluate import answer_stats, batches, device_of, pad_id
from cdist.models import (
    HookedTransformer,
    attention_inputs,
    frozen_head_residuals,
    hook_input,
    hook_resid_pre,
    hook_z,
    unembed,
)
from cdist.types import Circuit, Head, Scan

__all__ = [
    "ET_SEARCH",
    "ET_SEARCH_ADJACENT",
    "SEARCHES",
    "ReceiverInput",
    "SearchStep",
    "entity_tracking_circuit",
    "path_patched_prob",
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
    progress: bool = False,
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
        progress: show a tqdm bar over forward passes (rank 0's, under ``torchrun``).

    Returns:
        A ``Scan`` (method "path_patching", ranked by ``relative_change``, most negative first) with
        ``relative_change``, ``prob_change`` and ``relative_change_se``: ``[layer, head_index]``
        float32 CPU tensors (module doc).
    """
    check_items(data, position)
    if memory_budget is not None:
        batch_size = budget_batch_size(model, data, senders_per_pass, memory_budget)
    cfg, device = model.cfg, device_of(model)
    n_layers, n_heads = cfg.n_layers, cfg.n_heads
    receivers = tuple(sorted(set(receivers)))
    in_masks = receiver_masks(receivers, receiver_input, cfg)
    # senders must sit below a receiver
    top = max(r.layer for r in receivers) if receivers else n_layers
    asked = flat_heads(senders, n_layers, n_heads)
    run = rank_heads(asked[asked < top * n_heads])  # flat index layer * n_heads + head
    sums = PatchSums(model)
    sums.add_unreachable(asked[asked >= top * n_heads])
    names = [hook_z(layer) for layer in range(top)]
    # run 2 is the clean run below this layer
    start = min(r.layer for r in receivers) if receivers else 0
    resid_names = sorted({hook_resid_pre(0), hook_resid_pre(start)})
    total = -(-len(data) // batch_size) * -(-len(run) // senders_per_pass)
    bar = tqdm(total=total, disable=None if progress and is_main() else True, desc="path patching",
               unit="pass")
    for batch in batches(data, batch_size, pad_id(model), (position,), corrupt=True):
        if not receivers and not torch.equal(batch[position], batch["pos_last"]):
            raise InputError("receivers=() means the logits at pos_last; "
                             f"position={position!r} differs")
        ids, n_rows = batch["input_ids"].to(device), len(batch["input_ids"])
        rows = torch.arange(n_rows, device=device)
        here = batch[position].to(device)
        logits, clean = model.run_with_cache(ids, names_filter=names + resid_names)
        p_clean, _ = answer_stats(logits, batch["answer_id"], batch["pos_last"])
        _, corrupt = model.run_with_cache(batch["corrupt_input_ids"].to(device), names_filter=names)
        # [batch, head_index, d_head] at ``position``
        clean_z = [clean[name][rows, here] for name in names]
        corrupt_z = [corrupt[name][rows, here] for name in names]
        embed = clean[hook_resid_pre(0)][rows, here]
        for chunk in run.split(senders_per_pass) if len(run) else ():  # a rank may have none
            n_copies = len(chunk)
            at = batch[position].repeat(n_copies)
            variants = one_head_variants(chunk, n_heads, n_rows)
            # Run 1, at ``position`` only (cdist.models.frozen_head_residuals): every head frozen to
            # its clean z, copy j's sender taken from the corrupt run, MLPs recomputed.
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
                for (layer, name), mask in in_masks.items():
                    new = attention_inputs(model, layer, resid[layer])[receiver_input][:, None]
                    hooks.append((name, replacing(mask, new, at)))
                with model.hooks(fwd_hooks=hooks):
                    final = model(clean[hook_resid_pre(start)].repeat(n_copies, 1, 1),
                                  start_at_layer=start, stop_at_layer=n_layers)
                last = batch["pos_last"].repeat(n_copies).to(device)
                final = final[torch.arange(len(final), device=device), last]
            p, _ = answer_stats(unembed(model, final), batch["answer_id"].repeat(n_copies))
            sums.add_batch(chunk, p.view(n_copies, n_rows) - p_clean[None, :], p_clean)
            bar.update()
    bar.close()
    sums.add_other_ranks()
    return sums.scan("path_patching", len(data), position=position, receivers=receivers,
                     receiver_input=receiver_input if receivers else None)


def path_patched_prob(model: HookedTransformer, run: OneItem, layer: int, head: int,
                      sender_z: Tensor, in_masks: dict) -> Tensor:
    """One item's answer probability when sender ``(layer, head)``'s ``z`` at the item's position is
    ``sender_z`` and every other head is frozen to its clean ``z`` (run 1), read by the receivers of
    ``in_masks`` (run 2) or directly by the logits; plain full forward passes, differentiable in
    ``sender_z``. The slow twins' one step."""
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
    return answer_stats(logits, run.answer, run.last)[0].sum()


def reference_path_scan(model: HookedTransformer, data, receivers: Sequence[Head],
                        receiver_input: ReceiverInput, position: str, method: str,
                        change: Callable[[OneItem, int, int, dict], float]) -> Scan:
    """The slow twins' loop: every item, every sender below the last receiver's layer, one at a
    time; ``change(run, layer, head, in_masks)`` is one sender's change on one item."""
    cfg = model.cfg
    receivers = tuple(sorted(set(receivers)))
    in_masks = receiver_masks(receivers, receiver_input, cfg)
    top = max(r.layer for r in receivers) if receivers else cfg.n_layers
    sums = PatchSums(model)
    sums.add_unreachable(torch.arange(top * cfg.n_heads, cfg.n_layers * cfg.n_heads))
    for run in one_item_runs(model, data, position):
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
) -> Scan:
    """The slow twin of ``path_patching_scan``: one sender, one unpadded prompt,
    full forward passes.

    It freezes and patches by plain indexing and never stops early, so it shares with the fast path
    only the model and the receiver bookkeeping. A test oracle; use ``path_patching_scan`` for real
    work.
    """

    def change(run, layer, head, in_masks):
        corrupt = run.corrupt[hook_z(layer)][0, run.at, head]
        return path_patched_prob(model, run, layer, head, corrupt, in_masks).item() - run.p_clean

    return reference_path_scan(model, data, receivers, receiver_input, position, "path_patching",
                               change)


# --------------------------------------------------------------------------------------------------
# The entity-tracking search
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchStep:
    """One group of an iterative path-patching search.

    Attributes:
        name: the group's name.
        position: position column where its senders are patched (and its receivers' input is
            replaced).
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
# Our addition for the organisms' adjacent form (" apple F , pen Q . F" -> "apple"): there the value
# fetchers attend to the earlier mention of the queried label, which a head has made carry the
# object written just before it; that head feeds the fetchers' values at ``pos_prev_label``, a path
# the four groups above never test. On et-teacher the four groups alone found only the two fetchers
# (see README).
ET_SEARCH_ADJACENT: tuple[SearchStep, ...] = (
    *ET_SEARCH,
    SearchStep("object_binder", "pos_prev_label", "value_fetcher", "v"),
)
SEARCHES: dict[str, tuple[SearchStep, ...]] = {"prakash": ET_SEARCH, "adjacent": ET_SEARCH_ADJACENT}


def _search_fingerprint(model: HookedTransformer, data, search: Sequence[SearchStep]) -> str:
    """A hash of the model's weights and the items' columns the search reads."""
    digest = hashlib.sha256()
    with torch.no_grad():  # a float64 sum per tensor: cheap, and moved by any change of weights
        for name, p in sorted(model.named_parameters()):
            digest.update(f"{name}:{p.double().sum().item():.17g};".encode())
    columns = ("input_ids", "corrupt_input_ids", "answer_id", "pos_last",
               *sorted({step.position for step in search}))
    for column in dict.fromkeys(columns):
        digest.update(json.dumps(list(data[column])).encode())
    return digest.hexdigest()


def _saved_scans(path: Path, identity: str) -> dict | None:
    """A step's scans (as dicts) kept from an earlier search under ``identity``; None when there are
    none, or an edited or damaged file, or another search's, holds them (the step is remade)."""
    try:
        record = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        return None
    if not isinstance(record, dict) or record.get("identity") != identity:
        return None
    return record["scans"]


def entity_tracking_circuit(
    model: HookedTransformer,
    data,
    *,
    k: int | Mapping[str, int] = 2,
    min_effect: float | str = "noise",
    search: Sequence[SearchStep] = ET_SEARCH,
    model_name: str = "",
    batch_size: int = 16,
    senders_per_pass: int = 8,
    prefilter: int | None = None,
    checkpoint_dir: str | Path | None = None,
    progress: bool = False,
) -> tuple[Circuit, dict[str, Scan]]:
    """Prakash et al.'s backward path-patching search for the entity-tracking circuit.

    Value Fetchers: senders at ``pos_last`` into the logits. Position Transmitters: senders at
    ``pos_last`` into the fetchers' queries. Position Detectors: senders at ``pos_query_label`` into
    the transmitters' values. Structure Readers: senders at ``pos_prev_label`` into the detectors'
    values (``ET_SEARCH``; ``ET_SEARCH_ADJACENT`` adds the organisms' object binders). Each group
    keeps its top ``k`` heads whose effect clears ``min_effect`` (``select_heads``); a group whose
    receiver group is empty stays empty.

    At real depth (SmolLM2: 270 heads) each group's exact scan can be limited to the ``prefilter``
    senders that ``path_attribution_scan`` (two forward and two backward passes for all of them)
    ranks most important; its scan is kept as ``<group>_prefilter``, so how many of the exact top
    heads it caught can be checked against a full scan.

    Args:
        model: a HookedTransformer.
        data: entity-tracking items (``cdist.tasks.entity_tracking``).
        k: heads per group, one number or group name -> number.
        min_effect: ``"noise"`` (default: a head's relative change must be negative by more than
            ``NOISE_Z`` standard errors over the items) or a number (at most ``-min_effect``).
        search: the steps, in order; each step's receivers must come earlier.
        model_name: recorded in the circuit.
        batch_size, senders_per_pass: as for ``path_patching_scan``.
        prefilter: exact scans of this many pre-filtered senders per group (None: of every head).
        checkpoint_dir: each finished group's scans are saved there (``<group>.json``) and reused
            by a later call with the same model, items, receivers and ``prefilter`` (``k`` and
            ``min_effect`` only select from them), so an interrupted search resumes; a group
            saved under other ones is recomputed and replaced. Under ``torchrun`` rank 0 alone
            reads and writes them, and tells the others what it read.
        progress: a tqdm bar per group, advancing per forward pass (rank 0's, under ``torchrun``).

    Returns:
        The ``Circuit`` (groups in search order, positions, each head's score in the group that
        found it first) and each searched group's ``Scan`` (and ``<group>_prefilter`` scans).
    """
    from cdist.discovery.attribution_patching import path_attribution_scan

    if prefilter is not None and prefilter < 1:
        raise InputError(f"prefilter={prefilter}; give a number of senders >= 1, or None for all")
    # what a group's scans depend on besides its step and receivers (k and min_effect only select
    # from them, so a saved group can be re-selected under other ones)
    fingerprint = _search_fingerprint(model, data, search) if checkpoint_dir is not None else None
    groups: dict[str, tuple[Head, ...]] = {}
    found: dict[str, Scan] = {}
    scores: dict[Head, float] = {}
    for step in search:
        if step.receivers is not None and step.receivers not in groups:
            raise InputError(f"search step {step.name!r} receives from {step.receivers!r}, "
                             "which comes later or not at all; order the steps so that receivers "
                             "come first")
        receivers = groups[step.receivers] if step.receivers is not None else ()
        if step.receivers is not None and not receivers:
            groups[step.name] = ()
            continue
        saved = None if checkpoint_dir is None else Path(checkpoint_dir) / f"{step.name}.json"
        identity = None if saved is None else hashlib.sha256(json.dumps(
            [fingerprint, step.name, step.position, step.receiver_input,
             [str(r) for r in receivers], prefilter]).encode()).hexdigest()[:16]
        kept = None
        if saved is not None:  # rank 0 reads; every rank takes what it found, to reach its groups
            kept = broadcast(_saved_scans(saved, identity) if is_main() else None)
        if kept is not None:
            scans = {name: Scan.from_dict(d) for name, d in kept.items()}
        else:
            kw = dict(receivers=receivers, receiver_input=step.receiver_input,
                      position=step.position, batch_size=batch_size)
            scans, senders = {}, None
            if prefilter is not None:
                scans[f"{step.name}_prefilter"] = path_attribution_scan(model, data, **kw)
                # rank 0's candidates: the ranks' gradients may differ in their last bits
                senders = broadcast(scans[f"{step.name}_prefilter"].ranking().top(prefilter))
            scans[step.name] = path_patching_scan(model, data, senders_per_pass=senders_per_pass,
                                                  senders=senders, progress=progress, **kw)
            if saved is not None:
                if is_main():
                    atomic_write_json({"identity": identity, "step": step.name,
                                       "scans": {n: sc.to_dict() for n, sc in scans.items()}},
                                      saved)
                barrier()  # the file is there for every rank once its group is done
        found |= scans
        k_here = k if isinstance(k, int) else k.get(step.name, 0)
        groups[step.name] = select_heads(scans[step.name], k_here, min_effect)
        ranking = scans[step.name].ranking()
        for h in groups[step.name]:
            scores.setdefault(h, ranking[h])
    circuit = Circuit(groups, positions={step.name: step.position for step in search},
                      scores=scores, model=model_name, method="path_patching")
    return circuit, found
