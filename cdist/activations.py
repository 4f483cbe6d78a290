"""Heads' outputs at a task position, one row per example: what CKA compares and what matching aligns.

A head's activation (SPEC section 1, our default) is its output ``z`` (``blocks.{l}.attn.hook_z``, the
``d_head`` vector before ``W_O``) at one position per example, the last prompt token unless another position
column is named. Padding positions are never read: each row is taken at its own example's position.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor
from torch.func import functional_call

from cdist.evaluate import batches, device_of, pad_id
from cdist.types import Head

__all__ = ["head_z", "head_z_dataset"]


def head_z(
    model,
    input_ids: Int[Tensor, "batch pos"],
    heads: Sequence[Head],
    positions: Int[Tensor, " batch"],
    *,
    params: Mapping[str, Tensor] | None = None,
) -> tuple[Float[Tensor, "batch pos d_vocab"], dict[Head, Float[Tensor, "batch d_head"]]]:
    """Run the model once and return its logits and each head's ``z`` at each row's position.

    ``params`` replaces some of the model's parameters for this call (``torch.func.functional_call``), as
    masked-head training does with base + delta weights. Gradients flow through the returned tensors when
    the caller has them on (training); nothing is detached.
    """
    layers = sorted({h.layer for h in heads})
    kept: dict[int, Tensor] = {}

    def keep(z, hook):
        kept[hook.layer()] = z

    device = device_of(model)
    with model.hooks(fwd_hooks=[(Head(layer, 0).hook_z, keep) for layer in layers]):
        logits = functional_call(model, dict(params or {}), (input_ids.to(device),))
    rows = torch.arange(len(input_ids), device=device)
    at = positions.to(device)
    return logits, {h: kept[h.layer][rows, at, h.head] for h in heads}


@torch.no_grad()
def head_z_dataset(
    model, data, heads: Iterable[Head], *, position: str = "pos_last", batch_size: int = 64
) -> dict[Head, Float[Tensor, "n d_head"]]:
    """Each head's ``z`` at ``position`` for every item of a task dataset, in float32 on the CPU."""
    heads = list(heads)
    columns = () if position == "pos_last" else (position,)
    out: dict[Head, list[Tensor]] = {h: [] for h in heads}
    for batch in batches(data, batch_size, pad_id(model), columns):
        _, z = head_z(model, batch["input_ids"], heads, batch[position])
        for h in heads:
            out[h].append(z[h].float().cpu())
    return {h: torch.cat(rows) for h, rows in out.items()}
