"""Llama checkpoints as TransformerLens ``HookedTransformer``s: load, convert, save, create, and
the hook and weight names the rest of cdist uses to read and patch heads.

This package is the only part of cdist that imports ``transformer_lens`` (3.9, the last release
with ``HookedTransformer``), so that moving to TransformerLens 4's bridge changes this package
alone. Everything else imports from here; the modules are:

- ``config``: a transformers ``LlamaConfig`` <-> ``HookedTransformerConfig``.
- ``conversion``: Llama weights <-> TransformerLens weights (key table, einops patterns).
- ``loading``: ``load_llama``, ``save_llama``, ``new_llama``, ``keep_layers``, ``cast``, tokenizers
  and devices.
- ``hooks``: hook names (``hook_z``, ...), per-head weight names, ``check_heads``.
- ``forward``: single steps of a forward pass (path patching's frozen run, ``unembed``).
- ``requirements``: the TransformerLens versions cdist runs on, checked first.
"""

# first: importing it checks the TransformerLens version, before an import below fails deep inside
from cdist.models.requirements import check_transformer_lens  # noqa: I001
from transformer_lens import HookedTransformer, HookedTransformerConfig

from cdist.llama_files import OFFICIAL_LLAMA3, CheckpointNotFoundError, resolve_checkpoint
from cdist.models.config import (
    MAX_N_CTX,
    grouped_query,
    hf_config_from_hooked,
    hooked_config_from_hf,
)
from cdist.models.conversion import (
    hf_to_hooked_state_dict,
    hf_to_hooked_tensor,
    hooked_to_hf_state_dict,
)
from cdist.models.forward import (
    attention_inputs,
    finish_layer,
    frozen_head_residuals,
    head_writes,
    unembed,
)
from cdist.models.hooks import (
    check_heads,
    head_weights,
    hook_attn_out,
    hook_input,
    hook_pattern,
    hook_resid_mid,
    hook_resid_pre,
    hook_z,
)
from cdist.models.loading import (
    attach_tokenizer,
    cast,
    check_device,
    keep_layers,
    load_llama,
    new_llama,
    save_llama,
    tokenizer_prepends_bos,
)

__all__ = [
    "MAX_N_CTX",
    "OFFICIAL_LLAMA3",
    "CheckpointNotFoundError",
    "check_transformer_lens",
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
