"""Alignment diagnostics: a flat target and a crowded teacher head are flagged, a real target is
not."""

from __future__ import annotations

import warnings

import pytest
import torch

from cdist import alignment, matching, tasks
from cdist.models import new_llama
from cdist.types import Head, HeadPair


def test_variation_is_zero_for_a_constant_and_about_one_for_noise():
    g = torch.Generator().manual_seed(0)
    assert alignment.variation(torch.ones(50, 8) * 3.0) == 0.0
    assert alignment.variation(torch.zeros(50, 8)) == 0.0
    noise = torch.randn(400, 16, generator=g)
    assert alignment.variation(noise) == pytest.approx(1.0, abs=0.1)
    small = torch.ones(400, 16) + 1e-3 * noise
    assert alignment.variation(small) == pytest.approx(1e-3, rel=0.1)


@pytest.fixture(scope="module")
def models(tok):
    student = new_llama(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_mlp=64,
                        vocab_size=len(tok), seed=1, tokenizer=tok).eval()
    teacher = new_llama(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_mlp=64,
                        vocab_size=len(tok), seed=2, tokenizer=tok).eval()
    # kv group 0 of layer 1 writes nothing: query heads 0 and 1 output z = 0 everywhere
    with torch.no_grad():
        teacher.blocks[1].attn._W_V[0] = 0.0
    return student, teacher


def test_a_constant_target_is_flagged_and_a_real_one_is_not(tok, models):
    student, teacher = models
    items = tasks.entity_tracking(40, tokenizer=tok, n_boxes=3, template="compact", seed=0,
                                  split="test")
    flat, real = Head(1, 1), Head(1, 2)
    pairs = (HeadPair(Head(1, 0), flat, "pos_last", "pos_last"),
             HeadPair(Head(0, 3), real, "pos_prev_label", "pos_prev_label"))
    hm = matching.HeadMap(pairs, (Head(1, 0), Head(0, 3)), (flat, real), torch.zeros(2, 2),
                          "distance", "manual")
    with pytest.warns(alignment.AlignmentWarning,
                      match="flat alignment target a1.h0@pos_last -> a1.h1@pos_last"):
        report = alignment.diagnose(student, teacher, hm, items)
    by_pair = {r["teacher"]: r for r in report["pairs"]}
    assert by_pair["a1.h1"]["flat_target"] and by_pair["a1.h1"]["teacher_variation"] == 0.0
    assert not by_pair["a1.h2"]["flat_target"] and by_pair["a1.h2"]["teacher_variation"] > 0.1
    assert len(report["flags"]) == 1 and report["crowded"] == {}
    assert by_pair["a1.h1"]["cka_debiased"] == 0.0  # CKA with a constant is defined as 0
    # the plain CKA of training batches sits at its small-batch floor whether or not the rows are
    # paired
    assert 0.0 <= by_pair["a1.h2"]["cka_batch_shuffled"] <= 1.0


def test_a_crowded_teacher_head_is_flagged(tok, models):
    student, teacher = models
    items = tasks.entity_tracking(24, tokenizer=tok, n_boxes=3, template="compact", seed=1,
                                  split="test")
    students = (Head(0, 0), Head(0, 1), Head(1, 3))
    pairs = (tuple(HeadPair(s, Head(1, 2)) for s in students[:2])
             + (HeadPair(students[2], Head(0, 0)),))
    hm = matching.HeadMap(pairs, students, (Head(1, 2), Head(0, 0)), torch.zeros(3, 2),
                          "distance", "manual")
    with pytest.warns(alignment.AlignmentWarning,
                      match="sends 2 of 3 student heads to teacher head a1.h2") as caught:
        report = alignment.diagnose(student, teacher, hm, items)
    assert report["crowded"] == {"a1.h2": 2}
    # the advice names the command line's one-to-one matchers, and the warning the caller's line
    assert "--matchers ablation-1to1 ablation-baseline-1to1 cka-1to1" in report["flags"][-1]
    assert [w.filename for w in caught] == [__file__]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warn=False records the flags without warning
        quiet = alignment.diagnose(student, teacher, hm, items, warn=False)
        assert quiet["flags"] == report["flags"]


def test_the_shipped_object_binder_is_flat_at_the_last_token_and_real_where_it_works():
    """et-teacher's object binder a0.h3 (issue 9): read at the last token it is flagged, read at
    the previous mention of the label, where path patching places it, it is not."""
    from cdist import zoo

    teacher, tok = zoo.load("et-teacher")
    student, _ = zoo.load("et-student")
    items = tasks.entity_tracking(200, tokenizer=tok, n_boxes=7, template="adjacent", seed=9,
                                  split="test")
    pairs = (HeadPair(Head(0, 4), Head(0, 3), "pos_prev_label", "pos_prev_label"),
             HeadPair(Head(0, 13), Head(0, 3), "pos_last", "pos_last"))
    hm = matching.HeadMap(pairs, (Head(0, 4), Head(0, 13)), (Head(0, 3),), torch.zeros(2, 1),
                          "distance", "manual")
    report = alignment.diagnose(student, teacher, hm, items, warn=False)
    works, last = report["pairs"]
    assert not works["flat_target"] and works["teacher_variation"] > 0.5
    assert last["flat_target"] and last["teacher_variation"] < 2e-3
    assert abs(last["cka_debiased"]) < abs(works["cka_debiased"])
