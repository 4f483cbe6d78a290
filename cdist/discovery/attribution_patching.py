"""Attribution patching (Nanda 2023): the first-order Taylor estimate of activation patching
for every head.

For item ``i`` and head ``h``:
``prob_change ~ sum_pos (z_corrupt - z_clean)[i, pos, h] . d p_i / d z[i, pos, h]`` (over
``position`` only, if given), and ``relative_change`` = that / p_i, where ``z`` is the head's output
(``cdist.models.hook_z``) and ``p_i`` the clean answer's probability at ``pos_last``. One clean
forward and backward and one corrupt forward per batch, whatever the number of heads: a fast
pre-filter whose rank agreement with the exact ``activation_patching_scan`` is measured, not
assumed. ``attribution_patching_scan_reference`` is its plain twin: the same product, one head and
one unpadded prompt at a time, with the gradient taken of ``z`` itself through a full forward pass
per head.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from cdist.discovery import metrics
from cdist.discovery.engine import PatchSums, check_items, one_item_runs
from cdist.discovery.metrics import Target
from cdist.discovery.path_patching import (
    ReceiverInput,
    path_patched_value,
    receiver_masks,
    reference_path_scan,
)
from cdist.distributed import is_main
from cdist.evaluate import batches, device_of, pad_id
from cdist.models import HookedTransformer, hook_z
from cdist.progress import bar as progress_bar
from cdist.types import Head, Scan

__all__ = ["attribution_patching_scan", "attribution_patching_scan_reference",
           "path_attribution_scan", "path_attribution_scan_reference"]


def attribution_patching_scan(
    model: HookedTransformer, data, *, position: str | None = None, batch_size: int = 32,
    metric: str = "prob",
) -> Scan:
    """First-order estimate of ``activation_patching_scan`` for every head at once.

    For example i and head h:
    ``prob_change ~ sum_pos (z_corrupt - z_clean)[i, pos, h] . d p_i / d z[i, pos, h]`` (over
    ``position`` only, if given), and ``relative_change`` = that / p_i. One clean forward and
    backward and one corrupt forward per batch, whatever the number of heads. Parameter gradients
    are not accumulated (only ``z`` is differentiated). With ``metric``, ``p`` is that metric's
    value (``cdist.discovery.metrics``).
    """
    check_items(data, position, metric)
    n_layers, device = model.cfg.n_layers, device_of(model)
    sums = PatchSums(model, metric)
    names = [hook_z(layer) for layer in range(n_layers)]
    columns = metrics.columns(position, metric)
    for batch in batches(data, batch_size, pad_id(model), columns, corrupt=True):
        ids, target = batch["input_ids"].to(device), Target.of(batch, metric)
        with torch.no_grad():
            corrupt_logits, corrupt = model.run_with_cache(batch["corrupt_input_ids"].to(device),
                                                           names_filter=names)
        clean: dict[str, Tensor] = {}
        probes: dict[str, Tensor] = {}

        def probe(z, hook, clean=clean, probes=probes):
            # z + a zero leaf: d p / d leaf = d p / d z along every downstream path, including those
            # through later heads, whether or not the parameters require gradients (and none
            # accumulate in .grad).
            clean[hook.name] = z.detach()
            probes[hook.name] = torch.zeros_like(z, requires_grad=True)
            return z + probes[hook.name]

        with torch.enable_grad(), model.hooks(fwd_hooks=[(name, probe) for name in names]):
            logits = model(ids)
            rows = torch.arange(len(ids), device=logits.device)
            p = metrics.measure(logits, target, metric, batch["pos_last"])[0]
            grads = torch.autograd.grad(p.sum(), [probes[name] for name in names])
        sums.add_gap(p.detach(), _value(corrupt_logits, batch, metric))
        with torch.no_grad():
            for layer, (name, grad) in enumerate(zip(names, grads, strict=True)):
                delta = (corrupt[name] - clean[name]) * grad  # [batch, pos, head_index, d_head]
                if position is not None:
                    delta = delta[rows, batch[position].to(device)][:, None]
                sums.add_layer(layer, delta.sum((1, 3)), p.detach())  # [batch, head_index]
    return sums.scan("attribution_patching", len(data), position=position)


def attribution_patching_scan_reference(
    model: HookedTransformer, data, *, position: str | None = None, metric: str = "prob"
) -> Scan:
    """The slow twin of ``attribution_patching_scan``: one head, one unpadded prompt,
    one backward at a time.

    The head's clean ``z`` is replaced by a leaf equal to it, whose gradient is the derivative of
    metric; nothing is shared with the fast path but the model and ``metrics.measure``.
    """
    sums = PatchSums(model, metric)
    for run in one_item_runs(model, data, position, metric):
        sums.add_gap(torch.tensor([run.p_clean]), torch.tensor([run.p_corrupt]))
        for layer in range(model.cfg.n_layers):
            name = hook_z(layer)
            for head in range(model.cfg.n_heads):
                leaf = run.clean[name][0, :, head].clone().requires_grad_(True)  # [pos, d_head]

                def swap(z, hook, head=head, leaf=leaf):
                    z = z.clone()
                    z[0, :, head] = leaf
                    return z

                with torch.enable_grad(), model.hooks(fwd_hooks=[(name, swap)]):
                    p = metrics.measure(model(run.ids), run.target, metric, run.last)[0].sum()
                    (grad,) = torch.autograd.grad(p, leaf)
                delta = (run.corrupt[name][0, :, head] - run.clean[name][0, :, head]) * grad
                sums.add(layer, head, float(delta[run.at].sum()), p.item())
    return sums.scan("attribution_patching", len(data), position=position)


def path_attribution_scan(
    model: HookedTransformer,
    data,
    *,
    receivers: Sequence[Head] = (),
    receiver_input: ReceiverInput = "q",
    position: str = "pos_last",
    batch_size: int = 16,
    metric: str = "prob",
    progress: bool = False,
) -> Scan:
    """First-order estimate of ``path_patching_scan`` for every sender at once: the pre-filter of a
    search.

    Path patching's change is a function of the sender's ``z`` at ``position``; its first-order
    term is ``(z_corrupt - z_clean) . g``, with ``g`` the gradient of the answer's probability along
    path patching's own paths, which is two gradients chained (as edge attribution patching chains
    them, Syed et al. 2023):

    1. ``r`` = d p / d (the receivers' ``receiver_input`` at ``position``) in the clean run, those
       inputs taken as leaves (run 2 sets them, cutting what flows into them);
    2. ``g`` = d (receivers' input . r) / d z, in a run where every head's ``z`` is a constant
       (detached) plus a zero probe, so that a sender reaches the receivers only through the
       residual stream and the MLPs, as in path patching's run 1. With no receivers, ``g`` is d p /
       d z in that run (the logits are the receivers).

    Two forward and two backward passes per batch, whatever the number of senders (``progress``:
    a bar over batches). It is an
    estimate: how many of the exact scan's top senders its top candidates hold is to be measured
    against a full scan, not assumed. Twin:
    ``path_attribution_scan_reference`` (the derivative of the plain path-patching twin).

    Returns:
        A ``Scan`` (method "attribution_patching", with ``receivers``) of the estimated
        ``relative_change``, ``prob_change`` and ``relative_change_se``; senders at or above the
        last receiver's layer score 0.
    """
    check_items(data, position, metric)
    cfg, device = model.cfg, device_of(model)
    n_layers, n_heads = cfg.n_layers, cfg.n_heads
    receivers = tuple(sorted(set(receivers)))
    in_masks = receiver_masks(receivers, receiver_input, cfg)
    top = max(r.layer for r in receivers) if receivers else n_layers
    sums = PatchSums(model, metric)
    sums.add_unreachable(torch.arange(top * n_heads, n_layers * n_heads))
    names = [hook_z(layer) for layer in range(n_layers)]
    # receivers in layer 0 have no senders: nothing to differentiate
    columns = metrics.columns(position, metric)
    with progress_bar(-(-len(data) // batch_size) if top else 0, "attribution pre-filter",
                      enabled=progress and is_main(), unit="batch") as bar:
        for batch in batches(data, batch_size, pad_id(model), columns, corrupt=True) if top else ():
            ids = batch["input_ids"].to(device)
            rows = torch.arange(len(ids), device=device)
            here = batch[position].to(device)
            with torch.no_grad():
                corrupt_logits, corrupt = model.run_with_cache(
                    batch["corrupt_input_ids"].to(device), names_filter=names[:top])
            weights, p = (_receiver_weights(model, batch, in_masks, rows, here, metric) if receivers
                          else ({}, None))
            p, clean, grads = _frozen_gradients(model, batch, top, weights, p, rows, here, metric)
            sums.add_gap(p.detach(), _value(corrupt_logits, batch, metric))
            with torch.no_grad():
                for layer, grad in enumerate(grads):
                    name = names[layer]
                    delta = (corrupt[name][rows, here] - clean[name][rows, here]) * grad[rows, here]
                    sums.add_layer(layer, delta.sum(-1), p.detach())  # [batch, head_index]
            bar.update()
    return sums.scan("attribution_patching", len(data), position=position, receivers=receivers,
                     receiver_input=receiver_input if receivers else None)


def _value(logits: Tensor, batch: dict, metric: str) -> Tensor:
    """The metric's value of a batch's rows at ``pos_last`` (differentiable)."""
    return metrics.measure(logits, Target.of(batch, metric), metric, batch["pos_last"])[0]


def _receiver_weights(model: HookedTransformer, batch: dict, in_masks: dict, rows: Tensor,
                      here: Tensor, metric: str) -> tuple[dict[str, Tensor], Tensor]:
    """Step 1 of ``path_attribution_scan``: ``r`` = d p / d (the receivers' inputs at
    ``position``) in the clean run, per input hook name, kept for the receivers' heads only; and
    ``p``, the clean answer probabilities."""
    device = device_of(model)
    probes = {name: None for _, name in in_masks}
    masks = {name: mask for (_, name), mask in in_masks.items()}

    def probe_input(x, hook):
        # Run 2 sets the receivers' inputs at ``position``: they are leaves there, so no path
        # from one receiver into another receiver's set input counts.
        at = torch.zeros(x.shape[:3], dtype=torch.bool, device=x.device)
        at[rows, here] = masks[hook.name].to(x.device)
        probes[hook.name] = torch.zeros_like(x, requires_grad=True)
        return torch.where(at[..., None], x.detach(), x) + probes[hook.name]

    with torch.enable_grad():
        with model.hooks(fwd_hooks=[(name, probe_input) for name in probes]):
            p = _value(model(batch["input_ids"].to(device)), batch, metric)
        grads = torch.autograd.grad(p.sum(), list(probes.values()))
        weights = {}
        for ((_, name), mask), grad in zip(in_masks.items(), grads, strict=True):
            # only the receivers' heads, only at ``position``
            weights[name] = grad[rows, here] * mask.to(device)[None, :, None]
    return weights, p


def _frozen_gradients(
    model: HookedTransformer, batch: dict, top: int, weights: dict[str, Tensor],
    p: Tensor | None, rows: Tensor, here: Tensor, metric: str,
) -> tuple[Tensor, dict[str, Tensor], tuple[Tensor, ...]]:
    """Step 2 of ``path_attribution_scan``: the run in which every head's ``z`` is a constant
    plus a zero probe, so that a sender reaches the receivers only through the residual stream
    and the MLPs (path patching's run 1).

    Returns ``p`` (step 1's, or this run's when there are no receivers: the logits receive), each
    layer's clean ``z`` by hook name, and ``g`` for the layers below ``top``: d (receivers' inputs
    . ``weights``) / d z, or d p / d z with no receivers.
    """
    names = [hook_z(layer) for layer in range(model.cfg.n_layers)]
    clean: dict[str, Tensor] = {}
    z_probes: dict[str, Tensor] = {}
    inputs: dict[str, Tensor] = {}

    def freeze(z, hook):
        clean[hook.name] = z.detach()
        z_probes[hook.name] = torch.zeros_like(z, requires_grad=True)
        return z.detach() + z_probes[hook.name]

    def read(x, hook):
        inputs[hook.name] = x
        return x

    hooks = [(name, freeze) for name in names] + [(name, read) for name in weights]
    with torch.enable_grad():
        with model.hooks(fwd_hooks=hooks):
            logits = model(batch["input_ids"].to(device_of(model)))
        if weights:
            target = sum((inputs[name][rows, here] * w).sum() for name, w in weights.items())
            p = p.detach()
        else:
            p = _value(logits, batch, metric)
            target = p.sum()
        grads = torch.autograd.grad(target, [z_probes[name] for name in names[:top]])
    return p, clean, grads


def path_attribution_scan_reference(
    model: HookedTransformer,
    data,
    *,
    receivers: Sequence[Head] = (),
    receiver_input: ReceiverInput = "q",
    position: str = "pos_last",
    metric: str = "prob",
) -> Scan:
    """The slow twin of ``path_attribution_scan``: the derivative, at t = 0, of the plain
    path-patching twin's answer probability when one sender's ``z`` is ``z_clean + t (z_corrupt -
    z_clean)``, one sender and one unpadded prompt at a time (autograd through full forward
    passes)."""

    def change(run, layer, head, in_masks):
        clean = run.clean[hook_z(layer)][0, run.at, head]
        corrupt = run.corrupt[hook_z(layer)][0, run.at, head]
        t = torch.zeros((), requires_grad=True)
        with torch.enable_grad():
            p = path_patched_value(model, run, layer, head, clean + t * (corrupt - clean),
                                   in_masks, metric)
            (slope,) = torch.autograd.grad(p, t)
        return slope.item()

    return reference_path_scan(model, data, receivers, receiver_input, position,
                               "attribution_patching", change, metric)
