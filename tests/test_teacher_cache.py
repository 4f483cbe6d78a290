"""The teacher-activation cache: training from it is training with the live teacher; an interrupted
build resumes; a cache that does not fit the run is refused."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from test_distill import CFG, fresh, head_map, make_items, snapshot

from cdist import distill, matching, teacher_cache
from cdist.errors import FileFormatError, InputError, MismatchError
from cdist.teacher_cache import TeacherCache, build_teacher_cache
from cdist.types import Head


@pytest.fixture(scope="module")
def items(tok):
    return make_items(tok)


def build(tok, items, path, **kw):
    train, test = items
    return build_teacher_cache(fresh(tok, 2), head_map().sites()[1],
                               {"train": train, "eval": test}, path, **kw)


def test_training_from_the_cache_equals_training_with_the_live_teacher(tok, items, tmp_path):
    train, test = items
    cfg = replace(CFG, kd_weight=0.5, shuffle_teacher=True)  # every term the teacher feeds
    teacher = fresh(tok, 2)
    live_student = fresh(tok, 1)
    live = distill.distill(live_student, teacher, head_map(), train, test, cfg, tmp_path / "live",
                           progress=False)
    build(tok, items, tmp_path / "cache", logits=True, shard_items=20)
    assert sorted(p.name for p in (tmp_path / "cache").glob("*.safetensors")) == [
        "eval-00000.safetensors", "train-00000.safetensors", "train-00001.safetensors",
        "train-00002.safetensors"]  # 48 training items in shards of 20
    del teacher  # the student trains with the teacher out of memory
    cached_student = fresh(tok, 1)
    cached = distill.distill(cached_student, TeacherCache.load(tmp_path / "cache"), head_map(),
                             train, test, cfg, tmp_path / "cached", progress=False)
    before = snapshot(fresh(tok, 1))
    for name, value in snapshot(cached_student).items():
        torch.testing.assert_close(value, snapshot(live_student)[name], rtol=0, atol=1e-6)
    assert any(not torch.equal(v, before[n]) for n, v in snapshot(cached_student).items())
    for a, b in zip(live["metrics"], cached["metrics"], strict=True):
        assert a.keys() == b.keys()
        for key in ("loss", "ce", "kd", "cka_mean", "accuracy", "val_ce", "cka_val_mean",
                    "grad_ce", "grad_cka"):
            if a.get(key) is not None:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
    assert cached["metrics"][-1]["kd"] > 0  # KD was on, and read from the stored logits


def test_an_interrupted_build_resumes_at_the_missing_shard(tok, items, tmp_path, monkeypatch):
    build(tok, items, tmp_path, shard_items=20)
    first = (tmp_path / "train-00001.safetensors").read_bytes()
    (tmp_path / "train-00001.safetensors").unlink()
    with pytest.raises(FileFormatError, match="lacks the shards"):
        TeacherCache.load(tmp_path)
    made = []
    rows = teacher_cache._teacher_rows
    monkeypatch.setattr(teacher_cache, "_teacher_rows",
                        lambda *a, **k: made.append(len(a[1])) or rows(*a, **k))
    build(tok, items, tmp_path, shard_items=20)
    assert made == [20]  # only the missing shard was computed again
    assert (tmp_path / "train-00001.safetensors").read_bytes() == first
    made.clear()
    build(tok, items, tmp_path, shard_items=16)  # another layout: nothing is reused
    assert made == [16, 16, 16, 16]


def test_a_cache_that_does_not_fit_the_run_is_refused(tok, items, tmp_path):
    train, test = items
    cache = build(tok, items, tmp_path)
    student = fresh(tok, 1)
    with pytest.raises(MismatchError, match="no training items"):
        distill.distill(student, cache, head_map(), train.select(range(40)), test, CFG,
                        tmp_path / "a", progress=False)
    with pytest.raises(InputError, match="logits=True"):
        distill.distill(student, cache, head_map(), train, test, replace(CFG, kd_weight=1.0),
                        tmp_path / "b", progress=False)
    other = matching.random_matcher([Head(1, 1)], [Head(0, 0)], seed=0)
    with pytest.raises(MismatchError, match="no z for"):
        distill.distill(student, cache, other, train, test, CFG, tmp_path / "c", progress=False)
    cache.tokenizer = "another"
    with pytest.raises(MismatchError, match="another tokenizer"):
        distill.distill(student, cache, head_map(), train, test, CFG, tmp_path / "d",
                        progress=False)
    with pytest.raises(FileFormatError, match="no teacher cache"):
        TeacherCache.load(tmp_path / "nowhere")
