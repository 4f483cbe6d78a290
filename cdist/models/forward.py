"""Single steps of a Llama forward pass on rows of residual stream (path patching's frozen run).

Path patching (Wang et al. 2022, as used by Prakash et al. 2024) first runs the model with every
head's output ``z`` frozen to its value on the clean prompt, one sender's taken from the corrupt
prompt, and MLPs recomputed. Attention is the only thing that moves information between
positions, so with every ``z`` fixed one position's residual stream depends on that position alone:
its embedding, the heads' writes through ``W_O`` and its own MLPs (``frozen_head_residuals``). That
run therefore needs neither attention nor any other position. The other functions are the single
steps of TransformerLens' forward pass that it and the patching scans are built from.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from torch.func import functional_call
from transformer_lens import HookedTransformer

from cdist.errors import InputError


def frozen_head_residuals(
    model: HookedTransformer,
    embed: Float[Tensor, "rows d_model"],
    z: Sequence[Float[Tensor, "rows head_index d_head"]],
) -> list[Float[Tensor, "rows d_model"]]:
    """The residual stream at one position when every head's output ``z`` is given and only MLPs
    recompute.

    With every head's ``z`` fixed, nothing moves information between positions (attention is the
    only thing that does), so one position's residual stream depends on that position alone: its
    embedding, the given ``z`` through ``W_O``, and its own MLPs. Path patching's first run is
    exactly this, which lets it skip the attention of every layer and every other position.

    Args:
        model: a HookedTransformer with sequential attention and MLP (Llama; not
            ``parallel_attn_mlp``).
        embed: the residual stream entering layer 0 at the position (``blocks.0.hook_resid_pre``).
        z: per layer from the first, the heads' outputs at the position; as many layers as are
            wanted.

    Returns:
        ``len(z) + 1`` tensors: the residual stream entering layer 0, 1, ..., ``len(z)``.
    """
    if model.cfg.parallel_attn_mlp:
        raise InputError(
            "frozen_head_residuals needs sequential attention and MLP blocks; "
            "this model is parallel"
        )
    out = [embed]
    for layer, z_layer in enumerate(z):
        attn_out = head_writes(model, layer, z_layer) + model.blocks[layer].attn.b_O
        out.append(finish_layer(model, layer, out[-1] + attn_out))
    return out


def head_writes(
    model: HookedTransformer, layer: int, z: Float[Tensor, "rows head_index d_head"]
) -> Float[Tensor, "rows d_model"]:
    """What a layer's heads write into the residual stream for outputs ``z``:
    ``sum_h z[:, h] @ W_O[h]`` (without ``b_O``, so that it is linear in ``z``)."""
    return torch.einsum("rhd,hdm->rm", z, model.blocks[layer].attn.W_O)


def finish_layer(
    model: HookedTransformer, layer: int, resid_mid: Float[Tensor, "rows d_model"]
) -> Float[Tensor, "rows d_model"]:
    """The residual stream after layer ``layer``'s MLP, given the stream between its attention and
    MLP."""
    block = model.blocks[layer]
    mid = resid_mid[:, None, :]
    return (mid + block.mlp(block.ln2(mid)))[:, 0]


def attention_inputs(
    model: HookedTransformer, layer: int, resid: Float[Tensor, "rows d_model"]
) -> dict[str, Float[Tensor, "rows head_index d_head"]]:
    """Layer ``layer``'s ``hook_q``, ``hook_k`` and ``hook_v`` values (before rotary) for a residual
    stream.

    Under grouped-query attention ``k`` and ``v`` have one row per key/value head, as their hooks
    do.
    """
    block = model.blocks[layer]
    x = block.ln1(resid[:, None, :])
    q, k, v = block.attn.calculate_qkv_matrices(x, x, x)
    return {"q": q[:, 0], "k": k[:, 0], "v": v[:, 0]}


def unembed(
    model: HookedTransformer, resid: Float[Tensor, "rows d_model"],
    params: Mapping[str, Tensor] | None = None,
) -> Float[Tensor, "rows d_vocab"]:
    """The logits of a final residual stream (final norm, then unembedding); ``params`` replaces
    some of the model's parameters, as in ``torch.func.functional_call(model, params, ...)``."""
    x = resid[:, None, :]
    if not params:  # the scans' hot path: no reparametrisation
        return model.unembed(model.ln_final(x))[:, 0]
    for name in ("ln_final", "unembed"):
        own = {k.split(".", 1)[1]: v for k, v in params.items() if k.startswith(name + ".")}
        x = functional_call(getattr(model, name), own, (x,))
    return x[:, 0]
