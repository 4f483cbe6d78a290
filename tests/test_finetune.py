"""``cdist finetune`` (``cdist.finetune``): a model fine-tuned on a task, every weight, chosen heads
or a shallower copy, recorded and reused; the items of ``experiments/smollm2_models.py`` as they
were before it called it."""

from __future__ import annotations

import contextlib
import json
import signal

import datasets
import pytest
import torch
from test_bad_inputs import _main

from cdist import tasks, zoo
from cdist.errors import RunFolderError
from cdist.evaluate import accuracy
from cdist.finetune import FinetuneConfig, finetune, items
from cdist.models import load_llama
from cdist.store import model_fingerprint

SMALL = dict(train_items=32, val_items=16, steps=4, eval_every=2, batch_size=8, lr=1e-3)


@pytest.fixture
def student():
    return zoo.load("et-student", device="cpu")[0]


def _own(name: str) -> dict:
    """A zoo organism's own items (as ``cdist finetune --model NAME`` takes them)."""
    from cdist.cli.common import organism_kwargs

    return organism_kwargs(tasks.get_task("entity_tracking"), zoo.manifest(name)["config"])


def test_a_mix_of_box_counts_is_the_items_smollm2_models_made(tok):
    """The formula ``experiments/smollm2_models.py`` used before it called ``finetune``, written
    out: the same items, so a rebuild makes the recorded models."""
    cfg = FinetuneConfig(n_boxes=(2, 3, 4), template="compact", train_items=40, val_items=8)

    def before(n: int, seed: int, split: str):
        counts = range(2, 5)
        parts = [tasks.entity_tracking(n // 3 + (i < n % 3), tokenizer=tok, n_boxes=b,
                                       template="compact", seed=seed * 100 + b, split=split)
                 for i, b in enumerate(counts)]
        return datasets.concatenate_datasets(parts).shuffle(seed=seed)

    train, val = items(cfg, tok, 40, "train"), items(cfg, tok, 8, "test")
    assert train["prompt"] == before(40, 1000, "train")["prompt"]
    assert val["prompt"] == before(8, 2000, "test")["prompt"]
    assert sorted(train["n_boxes"]) == [2] * 14 + [3] * 13 + [4] * 13  # an even mix
    assert train["n_boxes"] != sorted(train["n_boxes"])  # shuffled
    assert not set(train["prompt"]) & set(val["prompt"])


def test_every_weight_is_fine_tuned_recorded_and_reused(student, tmp_path):
    cfg = FinetuneConfig(task_kwargs=_own("et-student"), **SMALL)
    val = items(cfg, student.tokenizer, cfg.val_items, "test")
    base = accuracy(student, val)
    source = model_fingerprint(student)
    record = finetune(student, cfg, tmp_path / "ft", source="et-student", command="cdist finetune")
    saved = load_llama(tmp_path / "ft" / "model")
    assert record["val_accuracy_before"] == base
    assert record["val_accuracy_after"] == accuracy(saved, val)
    assert record["fingerprint"] == model_fingerprint(saved) != source
    assert record["identity"]["source_fingerprint"] == source
    assert record["trained_heads"] == [] and record["layers"] == 2
    assert [step for step, _ in record["curve"]] == [0, 2, 4]
    assert all(torch.equal(p, saved.state_dict()[k]) for k, p in student.state_dict().items()
               if k in saved.state_dict())
    assert not (tmp_path / "ft" / "run" / "state.pt").exists()
    assert "cdist finetune" in (tmp_path / "ft" / "commands.log").read_text()
    assert json.loads((tmp_path / "ft" / "finetune.json").read_text()) == record

    fresh = zoo.load("et-student", device="cpu")[0]
    again = finetune(fresh, cfg, tmp_path / "ft")
    assert again["reused"] and again["fingerprint"] == record["fingerprint"]
    assert model_fingerprint(fresh) == source  # reused: nothing trained
    with pytest.raises(RunFolderError, match="finetune"):
        finetune(fresh, FinetuneConfig(**{**SMALL, "steps": 6}, task_kwargs=_own("et-student")),
                 tmp_path / "ft")


def test_a_finished_folder_is_reused_with_tuple_settings_and_refused_for_other_items(
        student, tmp_path, monkeypatch):
    """Settings held as tuples (boxes, heads, layers) read back from JSON as lists: the finished
    folder must still be known; a task file edited since is not the one trained on."""
    from cdist import finetune as module

    cfg = FinetuneConfig(task_kwargs=_own("et-student"), n_boxes=(3, 4), heads=("a1.h3",),
                         keep_layers=(0, 1), **SMALL)
    first = finetune(student, cfg, tmp_path / "ft")
    fresh = zoo.load("et-student", device="cpu")[0]
    assert finetune(fresh, cfg, tmp_path / "ft")["reused"]
    made = module.items
    monkeypatch.setattr(module, "items", lambda *a: made(*a).select(range(1, made(*a).num_rows)))
    with pytest.raises(RunFolderError, match="items"):
        finetune(fresh, cfg, tmp_path / "ft")
    assert json.loads((tmp_path / "ft" / "finetune.json").read_text()) == first


def test_chosen_heads_are_the_only_weights_that_change(student, tmp_path):
    cfg = FinetuneConfig(task_kwargs=_own("et-student"), heads=("a1.h3",), **SMALL)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    record = finetune(student, cfg, tmp_path / "ft")
    after = student.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"blocks.1.attn.W_Q", "blocks.1.attn.W_O"}, changed
    for name in changed:  # of head 3 only (W_Q and W_O are [head, ...])
        others = [h for h in range(student.cfg.n_heads) if h != 3]
        assert torch.equal(before[name][others], after[name][others])
    assert record["trained_heads"] == ["a1.h3"]


def test_a_shallower_copy_is_fine_tuned_and_the_source_kept(student, tmp_path):
    source = model_fingerprint(student)
    cfg = FinetuneConfig(task_kwargs=_own("et-student"), keep_layers=(1,), **SMALL)
    record = finetune(student, cfg, tmp_path / "ft")
    assert model_fingerprint(student) == source
    assert record["layers"] == 1 and load_llama(tmp_path / "ft" / "model").cfg.n_layers == 1


@pytest.mark.parametrize(("argv", "message"), [
    (["--model", "et-student", "--task", "ioi"], "--model et-student was trained on "
     "entity_tracking, not ioi; pass --task entity_tracking"),
    (["--model", "no-such"], "'no-such' is neither a zoo model"),
    (["--model", "et-student", "--keep-layers", "x-1"], "'x-1': give a layer or a range"),
    (["--model", "et-student", "--heads", "a9.h0"], "are outside the model"),
    (["--model", "et-student", "--heads", "a1.h0", "a1.h0"], "repeats a head"),
    (["--model", "et-student", "--steps", "0"], "steps=0: give a positive number"),
    (["--model", "et-student", "--n-boxes", "3", "3"], "repeats a count"),
    (["--model", "et-student", "--template", "when"], "has no template 'when'"),
    (["--model", "et-student", "--seed", "-1"], "seed=-1 is outside the seeds' range"),
], ids=["other-task", "unknown-model", "bad-layers", "head-outside", "head-twice", "no-steps",
        "boxes-twice", "unknown-template", "negative-seed"])
def test_the_command_refuses_in_one_line_before_writing(argv, message, tmp_path, capsys):
    out = tmp_path / "out"
    assert _main(["finetune", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cdist") and message in err[0], err
    assert not out.exists()


@pytest.mark.slow
def test_finetune_stopped_by_sigterm_resumes_to_the_same_model(tmp_path):
    from test_catalogue_runs import _check_stopped, _stopped

    argv = ["finetune", "--model", "et-student", "--steps", "8", "--eval-every", "2",
            "--train-items", "32", "--val-items", "16", "--batch-size", "8", "--lr", "1e-3"]
    assert _main([*argv, "--out", str(tmp_path / "straight")]) == 0
    out = tmp_path / "out"
    status, lines = _stopped([*argv, "--out", str(out)], out / "run" / "state.pt",
                             signal.SIGTERM)
    _check_stopped(status, lines, signal.SIGTERM, "finetune", out)
    assert not (out / "finetune.json").exists()
    stopped_at = torch.load(out / "run" / "state.pt", weights_only=False)["step"]
    assert 0 < stopped_at < 8
    with _resumed_from() as steps:
        assert _main([*argv, "--out", str(out)]) == 0
    assert steps == [stopped_at]  # resumed, not trained again from step 0
    made, resumed = (json.loads((d / "finetune.json").read_text()) for d in
                     (tmp_path / "straight", out))
    assert resumed["fingerprint"] == made["fingerprint"]  # bit for bit
    assert resumed["curve"] == made["curve"]


@contextlib.contextmanager
def _resumed_from():
    """The steps each training run of the body started from (``distill``'s ``Run.resume``)."""
    from cdist.distill import loop

    steps, resume = [], loop.Run.resume

    def spy(self, state_path):
        found = resume(self, state_path)
        steps.append(found[0])
        return found

    loop.Run.resume = spy
    try:
        yield steps
    finally:
        loop.Run.resume = resume
