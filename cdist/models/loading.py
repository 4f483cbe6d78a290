"""Llama checkpoints as HookedTransformers: load, save, create, cut down, cast.

``HookedTransformer.from_pretrained`` only takes official model names and then downloads them.
cdist instead reads a local transformers ``LlamaForCausalLM`` directory (``config.json`` plus
``*.safetensors``, sharded or not, plus tokenizer files), a GGUF file, or an official Llama-3 name
found in the local Hugging Face cache (``cdist.llama_files``), and never touches the network. The
weights are loaded unprocessed (no LayerNorm folding or centring), so a saved model is the loaded
one bit for bit.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformers import LlamaConfig, PreTrainedTokenizerBase

from cdist.checkpoints import atomic_directory
from cdist.errors import FileFormatError, InputError, MismatchError
from cdist.llama_files import (
    ATTENTION_KEY,
    SPECIAL_TOKEN_FIELDS,
    attention_layout,
    open_llama,
)
from cdist.models.config import hf_config_from_hooked, hooked_config_from_hf
from cdist.models.conversion import (
    _hooked_weight_names,
    _zero_biases,
    hf_to_hooked_tensor,
    hooked_to_hf_state_dict,
)


def _hooked(
    cfg: HookedTransformerConfig, tokenizer: PreTrainedTokenizerBase | None
) -> HookedTransformer:
    # TransformerLens 3.9 warns on every HookedTransformer that 4.0 replaces it with
    # TransformerBridge; cdist pins <4 and keeps that move to this package (see
    # ``cdist.models``), so the warning is noise here. The parameters are made on the model's device
    # directly (no host copy on the way to a GPU).
    with warnings.catch_warnings(), torch.device(cfg.device):
        warnings.filterwarnings("ignore", "HookedTransformer is deprecated", DeprecationWarning)
        model = HookedTransformer(cfg)
    # every forward pass embeds its tokens first, run_with_hooks (which calls forward directly)
    # included, so the embedding is where a prompt past the context is stopped before the rotary
    # tables fail on it with a shape error
    model.embed.register_forward_pre_hook(_within_context)
    # generation with a KV cache embeds one token at a time, so the embedding cannot see how far
    # into the context it is; the first attention layer gets the cache and can
    model.blocks[0].attn.register_forward_pre_hook(_cache_within_context, with_kwargs=True)
    if tokenizer is not None:
        attach_tokenizer(model, tokenizer)
    return model


def _within_context(embed: torch.nn.Module, args: tuple) -> None:
    """Refuse (``InputError``) tokens longer than the model's context, in one line with the
    numbers and the fix."""
    tokens = args[0] if args else None
    n_ctx = embed.cfg.n_ctx
    if isinstance(tokens, torch.Tensor) and tokens.ndim and tokens.shape[-1] > n_ctx:
        raise InputError(f"prompts of {tokens.shape[-1]} tokens are longer than the model's "
                         f"context (cfg.n_ctx = {n_ctx}); shorten the prompts, or load the model "
                         f"with n_ctx={tokens.shape[-1]} or more")


def _cache_within_context(attn: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    """Refuse (``InputError``) a cached forward pass (``generate``'s) that would run past the
    model's context, in one line with the numbers and the fix."""
    entry = kwargs.get("past_kv_cache_entry")
    query = kwargs.get("query_input", args[0] if args else None)
    if entry is None or not isinstance(query, torch.Tensor):
        return
    end, n_ctx = entry.past_keys.size(1) + query.shape[1], attn.cfg.n_ctx
    if end > n_ctx:
        raise InputError(f"generating to {end} tokens runs past the model's context "
                         f"(cfg.n_ctx = {n_ctx}); ask for fewer new tokens, shorten the prompt, "
                         f"or load the model with n_ctx={end} or more")


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
        checkpoint's special-token ids for ``save_llama``, ``model.source`` the ``source`` given
        (``cdist.discovery.circuit_eval.evaluate_circuit`` checks a circuit's model against its
        name).

    Raises:
        CheckpointNotFoundError, FileFormatError: a checkpoint that is damaged or inconsistent
            (``cdist.llama_files`` lists the checks), or a weight that is NaN or infinite (each
            is checked as it is read, and named).
        MismatchError: a tokenizer whose ids reach past the embedding.
    """
    check_device(device)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InputError(f"dtype={dtype!r}; pass a torch float dtype such as torch.bfloat16")
    ckpt = open_llama(source)
    ckpt.check()  # a damaged checkpoint is named before the model is made
    cfg = hooked_config_from_hf(ckpt.hf_config, dtype=dtype, device=device, n_ctx=n_ctx)
    cfg.init_weights = False  # about to be overwritten: skip the (slow, for 8B) random init
    tokenizer = tokenizer if tokenizer is not None else ckpt.tokenizer()
    _check_vocabulary(tokenizer, cfg.d_vocab, ckpt.path)
    model = _hooked(cfg, tokenizer)
    model.cfg.init_weights = True
    params = dict(model.named_parameters())
    filled = set()
    with torch.no_grad():
        for name, weight in ckpt.tensors(dtype):
            converted = hf_to_hooked_tensor(name, weight, cfg)
            if converted is None:
                continue
            key, value = converted
            _check_finite(weight, name, ckpt.path)
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
    model.source = str(source)  # as named, like a circuit found in it (Circuit.model)
    model.layer_origin = _layer_origin(getattr(ckpt.hf_config, LINEAGE_KEY, None), ckpt.path, cfg)
    return model.eval()


def _check_finite(weight: torch.Tensor, name: str, path: Path) -> None:
    """Refuse a weight that is not finite (one pass over the tensor, as it is loaded): a NaN or
    an inf spreads to every output, and a circuit search then finds nothing to explain."""
    finite = torch.isfinite(weight)
    if not bool(finite.all()):
        bad = weight[~finite]
        raise FileFormatError(f"{path}: {name} holds {int(bad.isnan().sum())} NaN and "
                              f"{int(bad.isinf().sum())} infinite values (read as {weight.dtype});"
                              " a checkpoint's weights must be finite: re-save or re-download it")


def _check_vocabulary(tokenizer: PreTrainedTokenizerBase | None, rows: int, path: Path) -> None:
    """Refuse a tokenizer that makes ids past the model's embedding (a lookup there fails)."""
    if tokenizer is None:
        return
    largest = max(tokenizer.get_vocab().values(), default=-1)
    if largest >= rows:
        raise MismatchError(f"{path}: the tokenizer makes ids up to {largest}, but the embedding "
                            f"has {rows} rows (vocab_size); give the tokenizer the model was "
                            "trained with")


# config.json's record of a checkpoint cut from a deeper model: each layer's number there
LINEAGE_KEY = "cdist_layer_origin"


def _layer_origin(value, path, cfg) -> tuple[int, ...] | None:
    if value is None:
        return None
    if (not isinstance(value, list) or len(value) != cfg.n_layers
            or not all(isinstance(i, int) and i >= 0 for i in value)):
        raise InputError(f"{path}: config.json's {LINEAGE_KEY} = {value!r} is not one layer "
                         f"number per layer ({cfg.n_layers}); correct or remove it")
    return tuple(value)


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
    the old checkpoint or the complete new one. The safetensors metadata records the attention
    layout (``cdist.llama_files.attention_layout``), which ``load_llama`` compares with the
    config's.

    Args:
        model: a Llama-shaped HookedTransformer whose extra biases are still zero.
        out_dir: the checkpoint directory; an existing one is replaced only if it is empty or is
            a checkpoint cdist wrote that holds nothing else (``cdist.checkpoints``), so a wrong
            path never wipes a folder or a file of the user's.
        tokenizer: overrides ``model.tokenizer``.

    Returns:
        ``out_dir``.

    Raises:
        RunFolderError: ``out_dir`` holds files cdist did not write.
        WriteError: the disk is full (or another write error); ``out_dir`` is as it was.
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
    if getattr(model, "layer_origin", None) is not None:
        setattr(hf_config, LINEAGE_KEY, list(model.layer_origin))

    def write(tmp: Path) -> None:
        weights = {k: v.cpu() for k, v in hf_sd.items()}
        # the attention layout, so that a config.json edited to regroup the heads is refused
        save_file(weights, tmp / "model.safetensors",
                  metadata={"format": "pt", ATTENTION_KEY: attention_layout(hf_config)})
        hf_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    return atomic_directory(out_dir, write)


def keep_layers(model: HookedTransformer, layers: Sequence[int]) -> HookedTransformer:
    """A shallower copy of ``model``: its embedding, the blocks ``layers`` (in that order,
    renumbered from 0), its final norm and unembedding.

    A cheap student of the teacher's own family, as a smaller pretrained model is in circuit
    distillation (Wadhwa, Amir & Wallace 2025). Dropping a run of middle layers harms a pretrained
    model far less than dropping its last ones, whose output the unembedding was trained to read
    (compare Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper Layers", who
    prune blocks of deep layers but keep the last). The copy shares no tensor with ``model`` and
    keeps its tokenizer and special-token ids, so ``save_llama`` writes it as a checkpoint of its
    own.

    The copy's ``layer_origin`` names, for each of its layers, the layer of the model it was cut
    from (composed through earlier cuts), and ``save_llama`` records it, so its heads' homologs in
    that model are known (``matching.homolog_map``).
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
    origin = getattr(model, "layer_origin", None)
    copied.layer_origin = tuple(origin[i] if origin is not None else i for i in layers)
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
