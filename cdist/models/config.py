"""A transformers ``LlamaConfig`` as a TransformerLens ``HookedTransformerConfig``, and back.

The Llama-3 architecture (Grattafiori et al. 2024, "The Llama 3 Herd of Models") in TransformerLens'
terms: RMS norm (Zhang & Sennrich 2019), rotary position embeddings over the whole head in the
NeoX layout (Su et al. 2021, "RoFormer"), a gated SiLU MLP (Shazeer 2020, "GLU Variants Improve
Transformer"), grouped-query attention (Ainslie et al. 2023, "GQA") and Llama-3.1's "llama3" rope
scaling, the NTK-by-parts interpolation of Peng et al. (2023, "YaRN"). Every number is read from
the checkpoint's config rather than from a table of known model names, so a model organism of any
shape converts like a real Llama-3.

``n_ctx`` (where TransformerLens truncates ``to_tokens``) is capped at ``MAX_N_CTX`` = 8192 rather
than Llama-3.1's 131072, since the cdist tasks are short and TransformerLens grows its rotary
tables on demand anyway; pass ``n_ctx`` to change it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from transformer_lens import HookedTransformerConfig
from transformers import LlamaConfig

from cdist.errors import InputError
from cdist.llama_files import SPECIAL_TOKEN_FIELDS

MAX_N_CTX = 8192


def _rope(hf_config: LlamaConfig) -> tuple[float, dict | None]:
    """(rope_theta, rope scaling dict or None), for transformers 4 (rope_scaling) and 5
    (rope_parameters)."""
    params = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None)
    params = dict(params or {})
    theta = params.get("rope_theta") or getattr(hf_config, "rope_theta", None) or 10000.0
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    if rope_type != "llama3":
        raise InputError(
            f"rope type {rope_type!r} is not supported; cdist converts default and llama3 rope"
        )
    return float(theta), params


def hooked_config_from_hf(
    hf_config: LlamaConfig,
    *,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    n_ctx: int | None = None,
) -> HookedTransformerConfig:
    """The HookedTransformerConfig of a transformers Llama config.

    Mirrors TransformerLens' own table for Llama-3.x (RMS norm, NeoX-style rotary over the whole
    head, gated SiLU MLP, grouped-query attention, llama3 "NTK-by-parts" rope scaling), but reads
    every number from ``hf_config``, including ``head_dim`` where it differs from
    ``hidden_size / num_attention_heads``.

    Args:
        hf_config: the checkpoint's config; ``model_type`` must be "llama".
        dtype: dtype of the TransformerLens model.
        device: its device.
        n_ctx: context length; default ``min(max_position_embeddings, MAX_N_CTX)``.

    Returns:
        The config, with ``original_architecture="LlamaForCausalLM"`` and
        ``default_prepend_bos=True``.
    """
    if getattr(hf_config, "model_type", None) != "llama":
        model_type = getattr(hf_config, "model_type", None)
        raise InputError(f"model_type is {model_type!r}; cdist converts 'llama' only")
    biased = getattr(hf_config, "attention_bias", False) or getattr(hf_config, "mlp_bias", False)
    if hf_config.hidden_act != "silu" or biased:
        raise InputError(
            "only bias-free SiLU Llamas are supported (hidden_act='silu', no attention/mlp bias)"
        )
    theta, scaling = _rope(hf_config)
    d_head = (
        getattr(hf_config, "head_dim", None)
        or hf_config.hidden_size // hf_config.num_attention_heads
    )
    n_kv = hf_config.num_key_value_heads or hf_config.num_attention_heads
    kwargs = {}
    if scaling is not None:  # the same fields TransformerLens fills for Llama-3.1/3.2
        kwargs = dict(
            use_NTK_by_parts_rope=True,
            NTK_by_parts_factor=float(scaling.get("factor", 1.0)),
            NTK_by_parts_low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
            NTK_by_parts_high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
            NTK_original_ctx_len=int(
                scaling.get("original_max_position_embeddings", hf_config.max_position_embeddings)
            ),
        )
    return HookedTransformerConfig(
        model_name=Path(getattr(hf_config, "name_or_path", "") or "llama").name,
        original_architecture="LlamaForCausalLM",
        n_layers=hf_config.num_hidden_layers,
        d_model=hf_config.hidden_size,
        n_heads=hf_config.num_attention_heads,
        d_head=d_head,
        # TransformerLens takes GQA's code path whenever this is set,
        # so plain multi-head attention is None.
        n_key_value_heads=n_kv if n_kv != hf_config.num_attention_heads else None,
        d_mlp=hf_config.intermediate_size,
        d_vocab=hf_config.vocab_size,
        n_ctx=n_ctx or min(hf_config.max_position_embeddings, MAX_N_CTX),
        eps=hf_config.rms_norm_eps,
        act_fn="silu",
        gated_mlp=True,
        normalization_type="RMS",
        final_rms=True,
        positional_embedding_type="rotary",
        rotary_adjacent_pairs=False,
        rotary_dim=d_head,
        rotary_base=theta,
        tie_word_embeddings=bool(hf_config.tie_word_embeddings),
        default_prepend_bos=True,
        dtype=dtype,
        device=device,
        **kwargs,
    )


def hf_config_from_hooked(
    cfg: HookedTransformerConfig,
    *,
    tie_word_embeddings: bool | None = None,
    token_ids: Mapping[str, int | list[int] | None] | None = None,
) -> LlamaConfig:
    """The transformers LlamaConfig of a Llama-shaped HookedTransformerConfig; inverts
    hooked_config_from_hf.

    Args:
        cfg: a config made by ``hooked_config_from_hf`` (or of the same shape).
        tie_word_embeddings: default ``cfg.tie_word_embeddings``.
        token_ids: ``bos_token_id``, ``eos_token_id``, ``pad_token_id``, ``unk_token_id``, written
            into the config as given (transformers' defaults, 1 and 2, are not Llama-3's).

    Returns:
        The config; ``max_position_embeddings`` is ``cfg.n_ctx`` (the uncapped value is not kept).
    """
    llama_like = (
        cfg.normalization_type == "RMS"
        and cfg.positional_embedding_type == "rotary"
        and cfg.gated_mlp
        and cfg.act_fn == "silu"
        and not cfg.rotary_adjacent_pairs
        and cfg.rotary_dim == cfg.d_head
        and cfg.d_vocab_out == cfg.d_vocab
    )
    if not llama_like:
        raise InputError(
            "config is not Llama-shaped (needs RMS norm, full NeoX rotary, gated SiLU MLP)"
        )
    rope_scaling = None
    if cfg.use_NTK_by_parts_rope:
        rope_scaling = {
            "rope_type": "llama3",
            "factor": cfg.NTK_by_parts_factor,
            "low_freq_factor": cfg.NTK_by_parts_low_freq_factor,
            "high_freq_factor": cfg.NTK_by_parts_high_freq_factor,
            "original_max_position_embeddings": cfg.NTK_original_ctx_len,
        }
    tied = cfg.tie_word_embeddings if tie_word_embeddings is None else tie_word_embeddings
    return LlamaConfig(
        vocab_size=cfg.d_vocab,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_mlp,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_key_value_heads or cfg.n_heads,
        head_dim=cfg.d_head,
        max_position_embeddings=cfg.n_ctx,
        rms_norm_eps=cfg.eps,
        rope_theta=float(cfg.rotary_base),
        rope_scaling=rope_scaling,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=tied,
        **{field: (token_ids or {}).get(field) for field in SPECIAL_TOKEN_FIELDS},
        torch_dtype=cfg.dtype,
        architectures=["LlamaForCausalLM"],
    )


def grouped_query(cfg: HookedTransformerConfig) -> bool:
    """Whether TransformerLens builds grouped-query attention, which keeps ``_W_K`` / ``_W_V`` per
    key/value head (whenever ``n_key_value_heads`` is set, even to ``n_heads``)."""
    return cfg.n_key_value_heads is not None
