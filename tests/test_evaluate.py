"""Batched, right-padded accuracy against a plain one-prompt-at-a-time loop (its slow twin)."""

from __future__ import annotations

import pytest
import torch

from cdist import evaluate, tasks


def test_padded_batches_match_unpadded_prompts(model, tok):
    # Stories with and without a visibility sentence differ in length, so batches really are padded.
    data = tasks.theory_of_mind(40, tokenizer=tok, seed=5, template="compact")
    assert len({len(ids) for ids in data["input_ids"]}) > 1
    with torch.no_grad():
        slow = [model(torch.tensor([ids]))[0, last].argmax().item()
                for ids, last in zip(data["input_ids"], data["pos_last"], strict=True)]
    assert evaluate.predictions(model, data, batch_size=16).tolist() == slow
    expected = sum(p == a for p, a in zip(slow, data["answer_id"], strict=True)) / len(slow)
    assert evaluate.accuracy(model, data, batch_size=7) == pytest.approx(expected)


def test_accuracy_of_an_oracle_is_one(tok):
    data = tasks.entity_tracking(30, tokenizer=tok, n_boxes=3, template="compact")

    class Oracle(torch.nn.Module):
        """Puts all its mass on each prompt's answer (looked up by the prompt's tokens)."""

        tokenizer = tok

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))
            self.answers = {tuple(i): a
                            for i, a in zip(data["input_ids"], data["answer_id"], strict=True)}

        def forward(self, ids):
            out = torch.zeros(*ids.shape, len(tok))
            for b, row in enumerate(ids.tolist()):
                out[b, :, self.answers[tuple(row)]] = 1.0
            return out

    assert evaluate.accuracy(Oracle(), data) == 1.0


def test_empty_dataset_is_a_clear_error(model, tok):
    data = tasks.entity_tracking(3, tokenizer=tok, n_boxes=2, template="compact").select([])
    with pytest.raises(ValueError, match="empty"):
        evaluate.accuracy(model, data)


def test_last_logits_are_the_full_forward_passes(model, tok):
    data = tasks.theory_of_mind(12, tokenizer=tok, seed=2, template="compact")
    batch = next(evaluate.batches(data, 12, evaluate.pad_id(model)))
    ids, last = batch["input_ids"], batch["pos_last"]
    with torch.no_grad():
        got = evaluate.last_logits(model, ids, last)
        want = evaluate.logits_at(model(ids), last)
    assert got.shape == (12, model.cfg.d_vocab)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
