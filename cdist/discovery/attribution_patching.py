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

import torch
from torch import Tensor

from cdist.discovery.engine import PatchSums, check_items, one_item_runs, patch_scan
from cdist.evaluate import answer_stats, batches, device_of, pad_id
from cdist.models import HookedTransformer, hook_z
from cdist.types import Scan

__all__ = ["attribution_patching_scan", "attribution_patching_scan_reference"]


def attribution_patching_scan(
    model: HookedTransformer, data, *, position: str | None = None, batch_size: int = 32
) -> Scan:
    """First-order estimate of ``activation_patching_scan`` for every head at once.

    For example i and head h:
    ``prob_change ~ sum_pos (z_corrupt - z_clean)[i, pos, h] . d p_i / d z[i, pos, h]`` (over
    ``position`` only, if given), and ``relative_change`` = that / p_i. One clean forward and
    backward and one corrupt forward per batch, whatever the number of heads. Parameter gradients
    are not accumulated (only ``z`` is differentiated).
    """
    check_items(data, position)
    cfg, device = model.cfg, device_of(model)
    n_layers, n_heads = cfg.n_layers, cfg.n_heads
    rel = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    diff = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    names = [hook_z(layer) for layer in range(n_layers)]
    columns = () if position is None else (position,)
    for batch in batches(data, batch_size, pad_id(model), columns, corrupt=True):
        ids = batch["input_ids"].to(device)
        with torch.no_grad():
            _, corrupt = model.run_with_cache(batch["corrupt_input_ids"].to(device),
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
    return patch_scan("attribution_patching", rel.flatten(), diff.flatten(), len(data),
                      (n_layers, n_heads), position=position)


def attribution_patching_scan_reference(
    model: HookedTransformer, data, *, position: str | None = None
) -> Scan:
    """The slow twin of ``attribution_patching_scan``: one head, one unpadded prompt,
    one backward at a time.

    The head's clean ``z`` is replaced by a leaf equal to it, whose gradient is the derivative of
    the answer's probability; nothing is shared with the fast path but the model and
    ``answer_stats``.
    """
    sums = PatchSums(model)
    for run in one_item_runs(model, data, position):
        for layer in range(model.cfg.n_layers):
            name = hook_z(layer)
            for head in range(model.cfg.n_heads):
                leaf = run.clean[name][0, :, head].clone().requires_grad_(True)  # [pos, d_head]

                def swap(z, hook, head=head, leaf=leaf):
                    z = z.clone()
                    z[0, :, head] = leaf
                    return z

                with torch.enable_grad(), model.hooks(fwd_hooks=[(name, swap)]):
                    p = answer_stats(model(run.ids), run.answer, run.last)[0].sum()
                    (grad,) = torch.autograd.grad(p, leaf)
                delta = (run.corrupt[name][0, :, head] - run.clean[name][0, :, head]) * grad
                sums.add(layer, head, float(delta[run.at].sum()), p.item())
    return sums.scan("attribution_patching", len(data), position=position)
