"""Heads' outputs at task positions, one row per example: what CKA compares and what matching
aligns.

A head's activation (cdist's choice) is its output ``z`` (``cdist.models.hook_z``, the ``d_head``
vector before ``W_O``) at one position per example. Which position is part of the request: a
*site* is a ``(head, position column)`` pair, such as ``(a0.h3, "pos_prev_label")``, and each row
is read at its own example's value of that column, so padding positions are never read. One forward
pass serves any number of sites, of any heads and positions.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor
from torch.func import functional_call

from cdist.errors import InputError
from cdist.evaluate import batches, device_of, pad_id
from cdist.models import HookedTransformer, check_heads, hook_z, unembed
from cdist.types import Head

__all__ = ["Site", "head_z", "head_z_dataset"]

Site = tuple[Head, str]  # (head, position column of the task's items)


def head_z(
    model: HookedTransformer,
    input_ids: Int[Tensor, "batch pos"],
    sites: Iterable[Site],
    positions: Mapping[str, Tensor],
    *,
    params: Mapping[str, Tensor] | None = None,
    logits: bool = True,
) -> tuple[Float[Tensor, "batch d_vocab"] | None, dict[Site, Float[Tensor, "batch d_head"]]]:
    """Run the model once and return its logits at each row's ``pos_last`` and each site's ``z``,
    row ``i`` at ``positions[column][i]``.

    Only ``pos_last`` is unembedded: the task losses read nothing else, and with a large vocabulary
    the unembedding is a sizeable share of a small model's forward pass. With ``logits=False`` the
    pass stops after the last layer holding a site.

    Args:
        model: a HookedTransformer.
        input_ids: the prompts (right-padded).
        sites: ``(head, column)`` pairs to read.
        positions: column name -> each row's position, ``[batch]`` (a batch of
            ``cdist.evaluate.batches`` has them, beside other columns such as its ``input_ids``).
        params: replaces some of the model's parameters for this call
            (``torch.func.functional_call``), as masked-head training does with base + delta
            weights.

    Returns:
        The logits at ``pos_last`` (None with ``logits=False``) and ``{site: z}``. Gradients flow
        through both when the caller has them on (training); nothing is detached.
    """
    sites = list(dict.fromkeys(sites))
    missing = sorted({column for _, column in sites} - set(positions)
                     | ({"pos_last"} - set(positions) if logits else set()))
    if missing:
        raise InputError(f"no positions given for columns {missing}; "
                         "build the batch with those columns")
    kept: dict[int, Tensor] = {}

    def keep(z, hook):
        kept[hook.layer()] = z

    device = device_of(model)
    layers = sorted({h.layer for h, _ in sites})
    params = dict(params or {})
    stop = model.cfg.n_layers if logits else max(layers, default=-1) + 1
    with model.hooks(fwd_hooks=[(hook_z(layer), keep) for layer in layers]):
        resid = functional_call(model, params, (input_ids.to(device),), {"stop_at_layer": stop})
    rows = torch.arange(len(input_ids), device=device)
    out = (unembed(model, resid[rows, positions["pos_last"].to(device)], params) if logits
           else None)
    return out, {(h, col): kept[h.layer][rows, positions[col].to(device), h.head]
                 for h, col in sites}


@torch.no_grad()
def head_z_dataset(
    model: HookedTransformer,
    data,
    sites: Iterable[Site | Head],
    *,
    position: str = "pos_last",
    batch_size: int = 64,
) -> dict:
    """Each site's ``z`` for every item of a task dataset, ``[n, d_head]`` in float32 on the CPU.

    ``sites`` are ``(head, column)`` pairs, keyed so in the result; a bare ``Head`` is read at
    ``position`` and keyed by the head alone.
    """
    keys = list(sites)
    asked: dict = {k: (k, position) if isinstance(k, Head) else k for k in keys}
    check_heads(model, [h for h, _ in asked.values()])
    columns: Sequence[str] = sorted({col for _, col in asked.values()} - {"pos_last"})
    out: dict = {k: [] for k in keys}
    for batch in batches(data, batch_size, pad_id(model), columns):
        _, z = head_z(model, batch["input_ids"], asked.values(), batch, logits=False)
        for k, site in asked.items():
            out[k].append(z[site].float().cpu())
    return {k: torch.cat(rows) for k, rows in out.items()}
