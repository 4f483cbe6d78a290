"""Llama checkpoints as TransformerLens ``HookedTransformer``s: load, convert, save, create.

This is the only module of cdist that imports ``transformer_lens`` (3.9, the last release with
``HookedTransformer``), so that moving to TransformerLens 4's bridge is one module's change.

``HookedTransformer.from_pretrained`` only takes official model names and then downloads them. cdist
instead reads a local transformers ``LlamaForCausalLM`` directory (``config.json`` plus
``*.safetensors``, sharded or not, plus tokenizer files), or finds an official Llama-3 name in the
local Hugging Face cache, and never touches the network. The conversion is two pure functions over
state dicts, ``hf_to_hooked_state_dict`` and its exact inverse ``hooked_to_hf_state_dict``, which
rename keys and rearrange weights with named einops patterns (as TransformerLens' own
``convert_llama_weights`` does):

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

Our choices: ``n_ctx`` (where TransformerLens truncates ``to_tokens``) is capped at
``MAX_N_CTX`` = 8192 rather than Llama-3.1's 131072, since the cdist tasks are short and
TransformerLens grows its rotary tables on demand anyway; pass ``n_ctx`` to change it. The weights
are loaded unprocessed (no LayerNorm folding or centring), so a saved model is the loaded one bit
for bit.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import einops
import torch
from jaxtyping import Float
from safetensors.torch import save_file
from torch import Tensor
from torch.func import functional_call
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformers import LlamaConfig, PreTrainedTokenizerBase

from cdist.checkpoints import atomic_directory
from cdist.errors import InputError
from cdist.llama_files import (
    OFFICIAL_LLAMA3,
    SPECIAL_TOKEN_FIELDS,
    CheckpointNotFoundError,
    open_llama,
    resolve_checkpoint,
)

__all__ = [
    "MAX_N_CTX",
    "OFFICIAL_LLAMA3",
    "CheckpointNotFoundError",
    "HookedTransformer",
    "HookedTransformerConfig",
    "attach_tokenizer",
    "attention_inputs",
    "cast",
    "check_device",
    "check_heads",
    "finish_layer",
    "grouped_query",
    "head_weights",
    "hook_attn_out",
    "hook_input",
    "hook_pattern",
    "hook_resid_mid",
    "hook_resid_pre",
    "hook_z",
    "frozen_head_residuals",
    "head_writes",
    "hf_config_from_hooked",
    "hf_to_hooked_state_dict",
    "hf_to_hooked_tensor",
    "hooked_config_from_hf",
    "hooked_to_hf_state_dict",
    "keep_layers",
    "load_llama",
    "new_llama",
    "resolve_checkpoint",
    "save_llama",
    "tokenizer_prepends_bos",
    "unembed",
]

MAX_N_CTX = 8192

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


def _hooked(
    cfg: HookedTransformerConfig, tokenizer: PreTrainedTokenizerBase | None
) -> HookedTransformer:
    # TransformerLens 3.9 warns on every HookedTransformer that 4.0 replaces it with
    # TransformerBridge; cdist pins <4 and keeps that move to this module (see the module
    # docstring), so the warning is noise here. The parameters are made on the model's device
    # directly (no host copy on the way to a GPU).
    with warnings.catch_warnings(), torch.device(cfg.device):
        warnings.filterwarnings("ignore", "HookedTransformer is deprecated", DeprecationWarning)
        model = HookedTransformer(cfg)
    if tokenizer is not None:
        attach_tokenizer(model, tokenizer)
    return model


def tokenizer_prepends_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether ``tokenizer`` puts a BOS token before a text on its own (Llama-3's does,
    SmolLM2's does not)."""
    return len(tokenizer("", add_special_tokens=True).input_ids) > 0


def attach_tokenizer(model: HookedTransformer, tokenizer: PreTrainedTokenizerBase) -> None:
    """Make ``tokenizer`` the model's tokenizer, BOS prepended exactly when it does so itself.

    TransformerLens' own ``set_tokenizer`` swaps in a copy that always prepends a BOS token, which
    for a checkpoint trained without one (SmolLM2 makes ``<|im_start|>``, a chat token, its BOS)
    changes every prompt and is what ``save_llama`` would then write. cdist keeps the checkpoint's
    tokenizer, so ``model.to_tokens``, the task generators and transformers all tokenize alike.
    ``model.checkpoint_tokenizer`` is the tokenizer as given (what ``save_llama`` writes);
    ``model.tokenizer`` is the same object, or, when it has no pad token (Llama-3), a copy whose
    pad token is its EOS token, because TransformerLens pads every call.
    """
    model.checkpoint_tokenizer = tokenizer
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.pad_token = tokenizer.eos_token
    model.tokenizer = tokenizer
    prepends = tokenizer_prepends_bos(tokenizer)
    model.cfg.default_prepend_bos = prepends
    model.cfg.tokenizer_prepends_bos = prepends


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch device that this machine has (``InputError`` naming it and the
    devices there are, so a mistyped or absent GPU fails before anything loads)."""
    n_cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    have = "cpu" + (f", cuda:0 to cuda:{n_cuda - 1}" if n_cuda else "")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"device {device!r} is not a device name; this machine has {have}"
                         ) from None
    if dev.type == "cpu" or (dev.type == "cuda" and (dev.index or 0) < n_cuda) or (
            dev.type == "mps" and torch.backends.mps.is_available()):
        return dev
    raise InputError(f"device {device!r} is not on this machine; it has {have}")


def load_llama(
    source: str | Path,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    tokenizer: PreTrainedTokenizerBase | None = None,
    n_ctx: int | None = None,
) -> HookedTransformer:
    """Load a local Llama checkpoint as a HookedTransformer, without the network.

    The model is made empty on ``device`` and filled one checkpoint tensor at a time, each cast to
    ``dtype`` as it is read, so the peak host memory is the model plus its largest tensor (for a
    bf16 model loaded as bf16 there is never a float32 copy), and a GPU model never passes through
    host memory whole.

    Args:
        source: a directory with ``config.json`` and ``*.safetensors`` (a
            ``model.safetensors.index.json`` names the shards), a ``.gguf`` file (dequantized;
            needs the ``gguf`` package), or an official Llama-3 name found in the HF cache (see
            ``cdist.llama_files.resolve_checkpoint``).
        device: where the model goes.
        dtype: its dtype.
        tokenizer: default: the checkpoint's own tokenizer, if it has one, else no tokenizer. It is
            attached unchanged (see ``attach_tokenizer``).
        n_ctx: context length; default ``min(max_position_embeddings, MAX_N_CTX)``.

    Returns:
        The model in eval mode, with raw (unfolded) weights; ``model.hf_token_ids`` keeps the
        checkpoint's special-token ids for ``save_llama``.
    """
    check_device(device)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InputError(f"dtype={dtype!r}; pass a torch float dtype such as torch.bfloat16")
    ckpt = open_llama(source)
    ckpt.check()  # a damaged checkpoint is named before the model is made
    cfg = hooked_config_from_hf(ckpt.hf_config, dtype=dtype, device=device, n_ctx=n_ctx)
    cfg.init_weights = False  # about to be overwritten: skip the (slow, for 8B) random init
    model = _hooked(cfg, tokenizer if tokenizer is not None else ckpt.tokenizer())
    model.cfg.init_weights = True
    params = dict(model.named_parameters())
    filled = set()
    with torch.no_grad():
        for name, weight in ckpt.tensors(dtype):
            converted = hf_to_hooked_tensor(name, weight, cfg)
            if converted is None:
                continue
            key, value = converted
            if params[key].shape != value.shape:
                raise InputError(f"{ckpt.path}: {name} has shape {tuple(value.shape)}, but the "
                                 f"config makes it {tuple(params[key].shape)}")
            params[key].copy_(value)
            filled.add(key)
            # dropped before the next tensor is read, so only one is ever resident
            del weight, value, converted
        if "unembed.W_U" not in filled and cfg.tie_word_embeddings:
            params["unembed.W_U"].copy_(params["embed.W_E"].T)
            filled.add("unembed.W_U")
        missing = sorted(_hooked_weight_names(cfg) - filled)
        if missing:
            raise InputError(f"{ckpt.path} lacks {len(missing)} weights, e.g. the one that "
                             f"becomes {missing[0]!r}; is the checkpoint complete?")
        for key in _zero_biases(cfg):
            params[key].zero_()
    model.hf_token_ids = ckpt.special_token_ids
    return model.eval()


def save_llama(
    model: HookedTransformer,
    out_dir: str | Path,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> Path:
    """Write ``model`` as a transformers ``LlamaForCausalLM`` folder that ``load_llama`` reads back
    exactly.

    The directory holds ``config.json``, ``model.safetensors`` (in the model's dtype) and the
    tokenizer files (of ``tokenizer``, else of ``model.checkpoint_tokenizer``, else of
    ``model.tokenizer``, if any), written as they are;
    the config's special-token ids are those of the checkpoint the model was loaded from
    (``model.hf_token_ids``), else of the tokenizer. It is written into a
    temporary directory beside ``out_dir`` and renamed into place, so ``out_dir`` is always either
    the old checkpoint or the complete new one.

    Args:
        model: a Llama-shaped HookedTransformer whose extra biases are still zero.
        out_dir: the checkpoint directory; an existing one is replaced only if it is empty or holds
            a ``config.json`` (so a wrong path never wipes an unrelated folder).
        tokenizer: overrides ``model.tokenizer``.

    Returns:
        ``out_dir``.
    """
    token_ids = getattr(model, "hf_token_ids", None) if tokenizer is None else None
    if tokenizer is None:
        tokenizer = getattr(model, "checkpoint_tokenizer", None) or model.tokenizer
    hf_sd = hooked_to_hf_state_dict(model.state_dict(), model.cfg)
    token_ids = token_ids or {
        field: getattr(tokenizer, field, None) for field in SPECIAL_TOKEN_FIELDS
    }
    hf_config = hf_config_from_hooked(
        model.cfg, tie_word_embeddings="lm_head.weight" not in hf_sd, token_ids=token_ids
    )

    def write(tmp: Path) -> None:
        weights = {k: v.cpu() for k, v in hf_sd.items()}
        save_file(weights, tmp / "model.safetensors", metadata={"format": "pt"})
        hf_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    return atomic_directory(out_dir, write)


def keep_layers(model: HookedTransformer, layers: Sequence[int]) -> HookedTransformer:
    """A shallower copy of ``model``: its embedding, the blocks ``layers`` (in that order,
    renumbered from 0), its final norm and unembedding.

    A cheap student of the teacher's own family, as a smaller pretrained model is in the paper.
    Dropping a run of middle layers harms a pretrained model far less than dropping its last ones,
    whose output the unembedding was trained to read (SmolLM2 without its last 15 layers starts at a
    validation CE of 47 on entity tracking). The copy shares no tensor with ``model`` and keeps its
    tokenizer and special-token ids, so ``save_llama`` writes it as a checkpoint of its own.
    """
    layers = [int(layer) for layer in layers]
    n = model.cfg.n_layers
    if not layers or len(set(layers)) < len(layers) or not all(0 <= i < n for i in layers):
        raise InputError(f"layers {layers}: give distinct layer numbers from 0 to {n - 1}")
    cfg = copy.deepcopy(model.cfg)
    cfg.n_layers, cfg.init_weights = len(layers), False  # every weight is copied in below
    cfg.n_params = model.cfg.n_params // n * len(layers)  # TransformerLens counts it per layer
    tokenizer = getattr(model, "checkpoint_tokenizer", None) or model.tokenizer
    copied = _hooked(cfg, tokenizer)
    copied.cfg.init_weights = model.cfg.init_weights
    new_index = {old: new for new, old in enumerate(layers)}
    kept = {}
    for key, value in model.state_dict().items():
        if key.startswith("blocks."):
            _, old, rest = key.split(".", 2)
            if int(old) not in new_index:
                continue
            key = f"blocks.{new_index[int(old)]}.{rest}"
        kept[key] = value
    copied.load_state_dict(kept, strict=True)  # copies; a name left out would raise
    if hasattr(model, "hf_token_ids"):
        copied.hf_token_ids = dict(model.hf_token_ids)
    return copied.eval()


def new_llama(
    *,
    n_layers: int,
    d_model: int,
    n_heads: int,
    n_kv_heads: int,
    d_head: int | None = None,
    d_mlp: int,
    vocab_size: int,
    n_ctx: int = 512,
    seed: int = 0,
    rope_theta: float = 10000.0,
    tokenizer: PreTrainedTokenizerBase | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> HookedTransformer:
    """A randomly initialised Llama-shaped HookedTransformer (untied embeddings, no rope scaling).

    The shape goes through a transformers LlamaConfig and ``hooked_config_from_hf``, so whatever is
    built here can be saved with ``save_llama`` and loaded by transformers. Weights use
    TransformerLens' default initialisation (normal, std 0.8/sqrt(d_model)), drawn from ``seed``
    without touching the global RNG.

    Args:
        n_layers, d_model, n_heads, n_kv_heads, d_mlp, vocab_size, n_ctx, rope_theta: the shape.
        d_head: default ``d_model // n_heads``.
        seed: the weights' seed.
        tokenizer: attached as ``model.tokenizer`` (saved with the model).
        device, dtype: of the model.

    Returns:
        The model.
    """
    hf_config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=d_model,
        intermediate_size=d_mlp,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        head_dim=d_head or d_model // n_heads,
        max_position_embeddings=n_ctx,
        rope_theta=rope_theta,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    cfg = hooked_config_from_hf(hf_config, dtype=dtype, device=device, n_ctx=n_ctx)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _hooked(cfg, tokenizer)


def cast(model: HookedTransformer, dtype: torch.dtype) -> HookedTransformer:
    """``model`` itself, its weights and buffers (the rotary tables too) now in ``dtype`` and
    ``model.cfg.dtype`` set to match, quietly (TransformerLens' ``to`` does both, takes a device or
    a dtype but not both, and prints). bfloat16 to float32 and back is exact, float32 to bfloat16
    rounds."""
    return model.to(dtype, print_details=False)


# --------------------------------------------------------------------------------------------------
# Hook names and head weights: the only place that knows TransformerLens' names and layouts
# --------------------------------------------------------------------------------------------------


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


def grouped_query(cfg: HookedTransformerConfig) -> bool:
    """Whether TransformerLens builds grouped-query attention, which keeps ``_W_K`` / ``_W_V`` per
    key/value head (whenever ``n_key_value_heads`` is set, even to ``n_heads``)."""
    return cfg.n_key_value_heads is not None


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


# --------------------------------------------------------------------------------------------------
# One position at a time, with every head's output given (path patching's frozen run)
# --------------------------------------------------------------------------------------------------


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
