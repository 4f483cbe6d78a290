"""Transformers Llama weights <-> TransformerLens weights: a key table and einops patterns.

The conversion is two pure functions over state dicts, ``hf_to_hooked_state_dict`` and its exact
inverse ``hooked_to_hf_state_dict`` (``hf_to_hooked_tensor`` converts one weight, so that a
checkpoint can be loaded a tensor at a time). They rename keys and rearrange weights with named
einops patterns, as TransformerLens' own ``convert_llama_weights`` does:

- ``q_proj`` ``[(head_index d_head), d_model]`` -> ``W_Q`` ``[head_index, d_model, d_head]``, and
  the same for ``k_proj``/``v_proj`` with the key/value heads. Under grouped-query attention
  (Llama 3: 8 key/value heads) TransformerLens keeps the real parameters as
  ``attn._W_K``/``attn._W_V`` ``[n_kv, d_model, d_head]`` and query head ``h`` reads key/value head
  ``h // (n_heads // n_kv)``, as transformers does.
- ``o_proj`` ``[d_model, (head_index d_head)]`` -> ``W_O`` ``[head_index, d_head, d_model]``; the
  MLP and the unembedding are transposed; RMS-norm weights keep their names' meaning.
- TransformerLens has biases that Llama lacks; they are loaded as zeros and must stay zero (the
  inverse refuses to drop a non-zero one). Tied embeddings (Llama-3.2) become a copy:
  ``W_U = W_E.T``.

One table, ``_LAYER_KEYS``, drives both directions, so the two cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping

import einops
import torch
from torch import Tensor
from transformer_lens import HookedTransformerConfig

from cdist.errors import InputError
from cdist.models.config import grouped_query

# HF weight -> TransformerLens weight. Axis names are TransformerLens';
# each inverse swaps the two sides.
QKV_PATTERN = "(head_index d_head) d_model -> head_index d_model d_head"
OUT_PATTERN = "d_model (head_index d_head) -> head_index d_head d_model"
MLP_IN_PATTERN = "d_mlp d_model -> d_model d_mlp"
MLP_OUT_PATTERN = "d_model d_mlp -> d_mlp d_model"
UNEMBED_PATTERN = "d_vocab d_model -> d_model d_vocab"

# Per layer: HF key suffix, TL key suffix, pattern (None: same layout),
# which head count the pattern splits.
_LAYER_KEYS = (
    ("input_layernorm.weight", "ln1.w", None, None),
    ("self_attn.q_proj.weight", "attn.W_Q", QKV_PATTERN, "q"),
    ("self_attn.k_proj.weight", "attn.{kv}W_K", QKV_PATTERN, "kv"),
    ("self_attn.v_proj.weight", "attn.{kv}W_V", QKV_PATTERN, "kv"),
    ("self_attn.o_proj.weight", "attn.W_O", OUT_PATTERN, "q"),
    ("post_attention_layernorm.weight", "ln2.w", None, None),
    ("mlp.gate_proj.weight", "mlp.W_gate", MLP_IN_PATTERN, None),
    ("mlp.up_proj.weight", "mlp.W_in", MLP_IN_PATTERN, None),
    ("mlp.down_proj.weight", "mlp.W_out", MLP_OUT_PATTERN, None),
)
# TransformerLens buffers, rebuilt by the model itself and never part of a checkpoint.
_TL_BUFFERS = ("attn.mask", "attn.IGNORE", "attn.rotary_sin", "attn.rotary_cos")


def _inverse(pattern: str) -> str:
    left, right = pattern.split(" -> ")
    return f"{right} -> {left}"


def _rearrange(
    w: Tensor, pattern: str | None, head_kind: str | None, cfg: HookedTransformerConfig
) -> Tensor:
    if pattern is None:
        return w
    if head_kind is None:
        return einops.rearrange(w, pattern)
    heads = cfg.n_heads if head_kind == "q" else (cfg.n_key_value_heads or cfg.n_heads)
    return einops.rearrange(w, pattern, head_index=heads)


def _zero_biases(cfg: HookedTransformerConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of the biases TransformerLens has and Llama lacks."""
    kv = "_" if grouped_query(cfg) else ""
    n_kv = cfg.n_key_value_heads or cfg.n_heads
    shapes: dict[str, tuple[int, ...]] = {"unembed.b_U": (cfg.d_vocab_out,)}
    for layer in range(cfg.n_layers):
        shapes |= {
            f"blocks.{layer}.attn.b_Q": (cfg.n_heads, cfg.d_head),
            f"blocks.{layer}.attn.{kv}b_K": (n_kv, cfg.d_head),
            f"blocks.{layer}.attn.{kv}b_V": (n_kv, cfg.d_head),
            f"blocks.{layer}.attn.b_O": (cfg.d_model,),
            f"blocks.{layer}.mlp.b_in": (cfg.d_mlp,),
            f"blocks.{layer}.mlp.b_out": (cfg.d_model,),
        }
    return shapes


def hf_to_hooked_tensor(
    name: str, weight: Tensor, cfg: HookedTransformerConfig
) -> tuple[str, Tensor] | None:
    """One transformers Llama weight as its TransformerLens name and layout.

    Args:
        name: its ``LlamaForCausalLM`` name (``model.layers.0.self_attn.q_proj.weight``, ...).
        weight: the tensor, in any dtype (kept).
        cfg: the target config (from ``hooked_config_from_hf``).

    Returns:
        ``(TransformerLens name, tensor)``, a view where the layout allows; None for old
        checkpoints' stored rotary frequencies, which TransformerLens recomputes. ``lm_head.weight``
        becomes ``unembed.W_U``; a tied checkpoint has none, and ``W_U`` is then ``W_E.T``.

    Raises:
        ValueError: ``name`` is not a weight of a bias-free Llama of this shape.
    """
    if name.endswith("rotary_emb.inv_freq"):
        return None
    if name == "model.embed_tokens.weight":
        return "embed.W_E", weight
    if name == "model.norm.weight":
        return "ln_final.w", weight
    if name == "lm_head.weight":
        return "unembed.W_U", einops.rearrange(weight, UNEMBED_PATTERN)
    prefix, _, suffix = name.partition(".layers.")
    layer, _, hf_key = suffix.partition(".")
    if prefix == "model" and layer.isdigit() and int(layer) < cfg.n_layers:
        for key, tl_key, pattern, head_kind in _LAYER_KEYS:
            if key == hf_key:
                kv = "_" if grouped_query(cfg) else ""
                return (f"blocks.{layer}.{tl_key.format(kv=kv)}",
                        _rearrange(weight, pattern, head_kind, cfg))
    raise InputError(f"{name!r} is not a weight of a bias-free {cfg.n_layers}-layer Llama")


def hf_to_hooked_state_dict(
    hf_sd: Mapping[str, Tensor], cfg: HookedTransformerConfig
) -> dict[str, Tensor]:
    """Rename and rearrange a whole transformers Llama state dict into TransformerLens' layout
    (``hf_to_hooked_tensor`` on each weight).

    Args:
        hf_sd: ``LlamaForCausalLM.state_dict()``; ``lm_head.weight`` may be missing when the
            embeddings are tied.
        cfg: the target config (from ``hooked_config_from_hf``).

    Returns:
        Every parameter of ``HookedTransformer(cfg)``, zero biases included, in ``cfg.dtype``; no
        buffers.

    Raises:
        KeyError: a weight is missing. ValueError: ``hf_sd`` has keys that are not a Llama's.
    """
    sd = dict(filter(None, (hf_to_hooked_tensor(k, v, cfg) for k, v in hf_sd.items())))
    if "unembed.W_U" not in sd:
        sd["unembed.W_U"] = einops.rearrange(sd["embed.W_E"], UNEMBED_PATTERN)
    for key, shape in _zero_biases(cfg).items():
        sd[key] = torch.zeros(shape)
    missing = sorted(_hooked_weight_names(cfg) - set(sd))
    if missing:
        raise KeyError(f"{len(missing)} weights are missing, e.g. {missing[0]!r}")
    return {k: v.to(cfg.dtype) for k, v in sd.items()}


def _hooked_weight_names(cfg: HookedTransformerConfig) -> set[str]:
    """The TransformerLens names of a Llama's own weights (no zero biases, no buffers)."""
    kv = "_" if grouped_query(cfg) else ""
    return {"embed.W_E", "ln_final.w", "unembed.W_U"} | {
        f"blocks.{layer}.{tl_key.format(kv=kv)}"
        for layer in range(cfg.n_layers) for _, tl_key, _, _ in _LAYER_KEYS
    }


def hooked_to_hf_state_dict(
    state_dict: Mapping[str, Tensor], cfg: HookedTransformerConfig
) -> dict[str, Tensor]:
    """The exact inverse of ``hf_to_hooked_state_dict``: a transformers ``LlamaForCausalLM`` state
    dict.

    Args:
        state_dict: ``model.state_dict()`` of a Llama-shaped HookedTransformer (buffers are
            ignored).
        cfg: its config.

    Returns:
        Contiguous tensors. ``lm_head.weight`` is left out when ``cfg.tie_word_embeddings`` is set
        and ``W_U`` still equals ``W_E.T`` exactly.

    Warning:
        A tied model whose ``W_U`` and ``W_E`` were trained apart comes back untied
        (``lm_head.weight`` set): build its config with
        ``tie_word_embeddings="lm_head.weight" not in result``, as ``save_llama`` does.
    """
    rest = dict(state_dict)
    for key in _zero_biases(cfg):
        bias = rest.pop(key, None)
        if bias is not None and bool(bias.any()):
            raise InputError(f"{key} is non-zero; Llama has no such bias, so it cannot be exported")
    kv = "_" if grouped_query(cfg) else ""
    w_e, w_u = rest.pop("embed.W_E"), rest.pop("unembed.W_U")
    hf = {"model.embed_tokens.weight": w_e, "model.norm.weight": rest.pop("ln_final.w")}
    lm_head = einops.rearrange(w_u, _inverse(UNEMBED_PATTERN))
    if not (cfg.tie_word_embeddings and torch.equal(lm_head, w_e)):
        hf["lm_head.weight"] = lm_head
    for layer in range(cfg.n_layers):
        for hf_key, tl_key, pattern, head_kind in _LAYER_KEYS:
            w = rest.pop(f"blocks.{layer}.{tl_key.format(kv=kv)}")
            inverse = None if pattern is None else _inverse(pattern)
            hf[f"model.layers.{layer}.{hf_key}"] = _rearrange(w, inverse, head_kind, cfg)
    leftover = [k for k in rest if not k.endswith(_TL_BUFFERS)]
    if leftover:
        raise InputError(f"{len(leftover)} keys have no Llama counterpart, e.g. {leftover[0]!r}")
    return {k: v.detach().contiguous() for k, v in hf.items()}
