"""Hook names and per-head weight names: the only place that knows TransformerLens' names and
layouts, so that the rest of cdist names a head's output, queries or weights through a function
rather than a string.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformers import LlamaConfig

from cdist.errors import InputError
from cdist.models.config import grouped_query


def check_heads(model: HookedTransformer | LlamaConfig, heads, what: str = "heads",
                fix: str = "use a circuit or head map of this model") -> None:
    """Refuse heads that ``model`` does not have (``InputError`` naming the first few), so that a
    circuit or head map of another model fails at once instead of ablating nothing. ``model`` may
    be a checkpoint's config, to check before the model loads."""
    if isinstance(model, LlamaConfig):
        n_layers, n_heads = model.num_hidden_layers, model.num_attention_heads
    else:
        n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    outside = sorted({h for h in heads if not (0 <= h.layer < n_layers and 0 <= h.head < n_heads)})
    if outside:
        raise InputError(f"{what} {', '.join(map(str, outside[:4]))} are outside the model "
                         f"({n_layers} layers x {n_heads} heads: a0.h0 to "
                         f"a{n_layers - 1}.h{n_heads - 1}); {fix}")


def hook_z(layer: int) -> str:
    """Hook of a layer's head outputs before ``W_O``: ``[batch, pos, head_index, d_head]``, one per
    query head."""
    return f"blocks.{layer}.attn.hook_z"


def hook_input(layer: int, which: str) -> str:
    """Hook of a layer's queries (``"q"``, ``[batch, pos, head_index, d_head]``) or keys/values
    (``"k"``, ``"v"``, ``[batch, pos, kv_head_index, d_head]`` under grouped-query attention),
    before rotary."""
    if which not in ("q", "k", "v"):
        raise InputError(f"attention input {which!r}; choose 'q', 'k' or 'v'")
    return f"blocks.{layer}.attn.hook_{which}"


def hook_pattern(layer: int) -> str:
    """Hook of a layer's attention probabilities: ``[batch, head_index, query_pos, key_pos]``."""
    return f"blocks.{layer}.attn.hook_pattern"


def hook_resid_pre(layer: int) -> str:
    """Hook of the residual stream entering layer ``layer``: ``[batch, pos, d_model]``."""
    return f"blocks.{layer}.hook_resid_pre"


def hook_resid_mid(layer: int) -> str:
    """Hook of the residual stream between layer ``layer``'s attention and its MLP."""
    return f"blocks.{layer}.hook_resid_mid"


def hook_attn_out(layer: int) -> str:
    """Hook of layer ``layer``'s attention output (the sum over heads of ``z @ W_O``, plus
    ``b_O``)."""
    return f"blocks.{layer}.hook_attn_out"


def head_weights(
    cfg: HookedTransformerConfig, layer: int, kinds: Sequence[str] = ("q", "o")
) -> dict[str, str]:
    """Parameter names of a layer's per-head weight tensors, each indexed by head along its first
    axis.

    Args:
        cfg: the model's config.
        layer: the layer.
        kinds: which of ``"q"`` (``W_Q`` ``[head_index, d_model, d_head]``), ``"o"`` (``W_O``
            ``[head_index, d_head, d_model]``), ``"k"`` and ``"v"``
            (``[kv_head_index, d_model, d_head]``: under grouped-query attention the real
            parameters are ``_W_K`` / ``_W_V``, indexed by key/value head).

    Returns:
        kind -> the name in ``model.named_parameters()``.
    """
    gqa = "_" if grouped_query(cfg) else ""
    names = {"q": "W_Q", "o": "W_O", "k": f"{gqa}W_K", "v": f"{gqa}W_V"}
    unknown = set(kinds) - set(names)
    if unknown:
        raise InputError(f"head weight kinds {sorted(unknown)}; choose from 'q', 'k', 'v', 'o'")
    return {kind: f"blocks.{layer}.attn.{names[kind]}" for kind in kinds}
