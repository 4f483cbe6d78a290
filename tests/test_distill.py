"""Masked-head training: only the chosen slices move, optimizer state is delta-sized, runs resume
exactly."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import unchecked

from cdist import distill, evaluate, matching, tasks
from cdist.checkpoints import TMP_PREFIX
from cdist.cka import linear_cka
from cdist.errors import RunFolderError
from cdist.models import hook_z, new_llama
from cdist.types import Head, HeadPair

TRAIN = [Head(1, 0), Head(1, 3)]  # kv groups 0 and 1 of layer 1 (4 heads, 2 kv heads)


def make_items(tok):
    train = tasks.entity_tracking(48, tokenizer=tok, n_boxes=3, template="compact", seed=0,
                                  split="train")
    test = tasks.entity_tracking(16, tokenizer=tok, n_boxes=3, template="compact", seed=1,
                                 split="test")
    return train, test


@pytest.fixture(scope="module")
def items(tok):
    return make_items(tok)


def fresh(tok, seed):
    return new_llama(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_mlp=64,
                     vocab_size=len(tok), seed=seed, tokenizer=tok).eval()


def head_map():
    return matching.random_matcher(TRAIN, [Head(0, 1), Head(1, 2)], seed=0)


CFG = distill.DistillConfig(steps=6, lr=3e-2, batch_size=8, cka_weight=1.0, eval_every=3,
                            kv_policy="group")


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_only_the_trained_slices_change(tok, items, tmp_path):
    student, teacher = fresh(tok, 1), fresh(tok, 2)
    teacher.blocks[0].attn.W_Q.requires_grad_(False)  # the caller's flags, mixed on purpose
    student.blocks[1].attn.W_O.requires_grad_(False)
    flags = {m: [p.requires_grad for p in m.parameters()] for m in (student, teacher)}
    before, teacher_before = snapshot(student), snapshot(teacher)
    distill.distill(student, teacher, head_map(), *items, CFG, tmp_path, progress=False)
    after = snapshot(student)
    for m, was in flags.items():  # neither model's requires_grad flags are left changed
        assert [p.requires_grad for p in m.parameters()] == was
    moved = {"blocks.1.attn.W_Q": [0, 3], "blocks.1.attn.W_O": [0, 3],
             "blocks.1.attn._W_K": [0, 1], "blocks.1.attn._W_V": [0, 1]}
    for name, value in after.items():
        rows = moved.get(name, [])
        for r in range(value.shape[0] if value.ndim else 0):
            same = torch.equal(value[r], before[name][r])
            assert same != (r in rows), (name, r)
        if not value.ndim:
            assert torch.equal(value, before[name])
    assert all(torch.equal(p, teacher_before[n]) for n, p in snapshot(teacher).items())


def test_query_output_policy_is_the_default_and_leaves_keys_and_values(tok, items, tmp_path):
    assert distill.DistillConfig().kv_policy == "qo"
    student, teacher = fresh(tok, 1), fresh(tok, 2)
    before = snapshot(student)
    distill.distill(student, teacher, head_map(), *items, replace(CFG, kv_policy="qo"), tmp_path,
                    progress=False)
    after = snapshot(student)
    for name in ("blocks.1.attn._W_K", "blocks.1.attn._W_V"):
        assert torch.equal(after[name], before[name])
    assert not torch.equal(after["blocks.1.attn.W_Q"], before["blocks.1.attn.W_Q"])


def test_optimizer_state_is_the_size_of_what_is_trained_and_gone_when_finished(tok, items,
                                                                            tmp_path):
    student, teacher = fresh(tok, 1), fresh(tok, 2)
    mid_run = []

    def read_checkpoint(model):  # evaluations run before their checkpoint: read at step 6, step 3's
        if (tmp_path / "state.pt").exists():
            mid_run.append(torch.load(tmp_path / "state.pt", weights_only=False))
        return {}

    result = distill.distill(student, teacher, head_map(), *items, CFG, tmp_path, progress=False,
                             evaluate_fn=read_checkpoint)
    d_model, d_head = 32, 8
    # (W_Q + W_O) x 2 heads, (K + V) x 2 groups
    expected = 2 * 2 * d_model * d_head + 2 * 2 * d_model * d_head
    assert result["trainable"]["params"] == expected and result["trainable"]["heads"] == 2
    [state] = mid_run  # the step-3 checkpoint, read at the step-6 evaluation
    assert state["step"] == 3
    moments = sum(s["exp_avg"].numel() + s["exp_avg_sq"].numel()
                  for s in state["opt"]["state"].values())
    assert moments == 2 * expected
    total = sum(p.numel() for p in student.parameters())
    assert result["trainable"]["param_share"] == pytest.approx(expected / total)
    final = torch.load(tmp_path / "state.pt", weights_only=False)
    assert final["step"] == CFG.steps and "opt" not in final
    assert sum(w.numel() for w in final["weights"].values()) == expected
    # a finished run is reused as it stands: same weights, no step and no evaluation run
    again = fresh(tok, 1)
    out = distill.distill(again, teacher, head_map(), *items, CFG, tmp_path, progress=False,
                          evaluate_fn=lambda model: pytest.fail("a finished run was run again"))
    assert out["metrics"] == result["metrics"]
    for (name, a), b in zip(student.named_parameters(), again.parameters(), strict=True):
        assert torch.equal(a, b), name
    # an unfinished checkpoint must carry its optimizer state
    torch.save({**final, "step": 3}, tmp_path / "state.pt")
    with pytest.raises(ValueError, match="unfinished run without its optimizer state"):
        distill.distill(fresh(tok, 1), teacher, head_map(), *items, CFG, tmp_path,
                        progress=False)


def test_without_a_teacher_it_fine_tunes_on_the_items_answers(tok, items, tmp_path):
    train, val = items

    def gold_ce(model, data):
        with torch.no_grad():
            logits = model(torch.tensor(data["input_ids"]))
        last = evaluate.logits_at(logits, torch.tensor(data["pos_last"]))
        return torch.nn.functional.cross_entropy(last, torch.tensor(data["answer_id"])).item()

    model = fresh(tok, 1)
    start = gold_ce(model, train)
    cfg = distill.DistillConfig(steps=40, lr=3e-3, batch_size=8, eval_every=20, trainable="all",
                                labels="answers")
    out = distill.distill(model, None, None, train, val, cfg, tmp_path, progress=False)
    assert gold_ce(model, train) < start - 0.5
    # the logged validation CE is the CE on the items' answers
    assert out["metrics"][-1]["val_ce"] == pytest.approx(gold_ce(model, val), rel=1e-4)
    for bad in (replace(cfg, labels="teacher"), replace(cfg, kd_weight=1.0)):
        with pytest.raises(ValueError, match="teacher=None only fine-tunes"):
            distill.distill(fresh(tok, 1), None, None, train, val, bad, tmp_path / "bad",
                            progress=False)
    with pytest.raises(ValueError, match="labels="):
        replace(cfg, labels="gold")


def test_a_bfloat16_student_trained_in_full_keeps_updates_below_its_precision(tok, items,
                                                                              tmp_path):
    """AdamW on bfloat16 weights would drop every step of 2e-5 on a weight above 0.005 (half its
    spacing is larger); the fully trained student trains in float32 and comes back in bfloat16
    with the summed updates."""
    from cdist.models import cast

    train, val = items
    model = cast(fresh(tok, 1), torch.bfloat16)
    before = snapshot(model)
    cfg = distill.DistillConfig(steps=12, lr=2e-5, batch_size=8, eval_every=12, trainable="all",
                                labels="answers")
    distill.distill(model, None, None, train, val, cfg, tmp_path, progress=False)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    w, w0 = model.blocks[0].attn.W_Q.detach(), before["blocks.0.attn.W_Q"]
    large = w0.float().abs() > 0.01  # where one bfloat16 step of 2e-5 rounds away
    assert large.sum() > 100 and (w != w0)[large].float().mean() > 0.05


def test_interrupted_run_resumes_to_the_same_weights(tok, items, tmp_path):
    student, teacher = fresh(tok, 1), fresh(tok, 2)
    distill.distill(student, teacher, head_map(), *items, CFG, tmp_path / "straight",
                    progress=False)

    calls = []

    def crash_at_second_evaluation(model):
        calls.append(1)
        if len(calls) == 3:  # step 0, step 3, then step 6: crash before the step-6 checkpoint
            raise KeyboardInterrupt
        return {}

    resumed = fresh(tok, 1)
    with pytest.raises(KeyboardInterrupt):
        distill.distill(resumed, teacher, head_map(), *items, CFG, tmp_path / "cut", progress=False,
                        evaluate_fn=crash_at_second_evaluation)
    assert torch.load(tmp_path / "cut" / "state.pt", weights_only=False)["step"] == 3
    resumed = fresh(tok, 1)
    out = distill.distill(resumed, teacher, head_map(), *items, CFG, tmp_path / "cut",
                          progress=False)
    assert [m["step"] for m in out["metrics"]] == [0, 3, 6]
    for (name, a), b in zip(student.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), name


# A distillation (this module's CFG) in its own process, killed by SIGKILL: "training" after the
# step-3 checkpoint, at the step-6 evaluation; "saving" half-way through writing the step-6
# checkpoint (its temporary file half written).
KILLED = """
import os, signal, sys
sys.path.insert(0, sys.argv[3])
import torch
import test_distill as T
from cdist import distill, zoo

tok = zoo.organism_tokenizer()
where, calls, saves, real_save = sys.argv[1], [], [], torch.save

def evaluate_fn(model):
    calls.append(1)
    if where == "training" and len(calls) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return {}

def save_half_then_die(obj, f):
    saves.append(1)
    real_save(obj, f)
    if len(saves) == 2:
        f.flush()
        path = f.name  # the temporary file cdist writes through
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)

if where == "saving":
    torch.save = save_half_then_die
distill.distill(T.fresh(tok, 1), T.fresh(tok, 2), T.head_map(), *T.make_items(tok), T.CFG,
                sys.argv[2], progress=False, evaluate_fn=evaluate_fn)
"""


def state_digest(model) -> str:
    """SHA-256 of a model's state dict (names and bytes, in name order)."""
    import hashlib

    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def test_a_run_killed_in_training_or_in_a_checkpoint_write_resumes_bit_for_bit(tok, items,
                                                                              tmp_path):
    import signal
    import subprocess
    import sys
    from pathlib import Path

    straight = fresh(tok, 1)
    want = distill.distill(straight, fresh(tok, 2), head_map(), *items, CFG,
                           tmp_path / "straight", progress=False)
    steps = [{k: v for k, v in m.items() if "time" not in k} for m in want["metrics"]]
    for where in ("training", "saving"):
        run_dir = tmp_path / where
        killed = subprocess.run([sys.executable, "-c", KILLED, where, str(run_dir),
                                 str(Path(__file__).parent)], capture_output=True, text=True,
                                timeout=600)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        assert torch.load(run_dir / "state.pt", weights_only=False)["step"] == 3
        if where == "saving":  # the half-written checkpoint is a temporary file, never state.pt
            assert list(run_dir.glob(f"{TMP_PREFIX}state.pt-*.tmp"))
        resumed = fresh(tok, 1)
        out = distill.distill(resumed, fresh(tok, 2), head_map(), *items, CFG, run_dir,
                              progress=False)
        assert [{k: v for k, v in m.items() if "time" not in k} for m in out["metrics"]] == steps
        assert state_digest(resumed) == state_digest(straight), where
        assert not list(run_dir.glob(".*.tmp"))  # the killed writer's half file is gone
        print(f"killed while {where}: resumed state dict sha256 {state_digest(resumed)}")


def test_alignment_raises_cka_and_full_training_moves_everything(tok, items, tmp_path):
    student, teacher = fresh(tok, 1), fresh(tok, 2)
    cfg = replace(CFG, steps=30, ce_weight=0.0, cka_weight=1.0, eval_every=30)
    out = distill.distill(student, teacher, head_map(), *items, cfg, tmp_path / "align",
                          progress=False)
    first = distill.distill(fresh(tok, 1), teacher, head_map(), *items,
                            replace(cfg, steps=1, eval_every=1),
                            tmp_path / "one", progress=False)["metrics"][-1]["cka_mean"]
    assert out["metrics"][-1]["cka_mean"] > first + 0.05
    full, before = fresh(tok, 1), snapshot(fresh(tok, 1))
    out = distill.distill(full, teacher, None, *items,
                          replace(CFG, cka_weight=0.0, trainable="all"),
                          tmp_path / "all", progress=False)
    for name, p in full.named_parameters():
        if torch.any(before[name]) or name.split(".")[-1].startswith("W"):
            assert not torch.equal(p, before[name]), name
        else:  # TransformerLens's zero biases stay zero
            assert torch.equal(p, before[name]), name
    assert out["trainable"]["head_share"] == 1.0
    assert (tmp_path / "all" / "metrics.csv").read_text().startswith("step,")


def test_bad_settings_are_refused(tok, items, tmp_path):
    student, teacher = fresh(tok, 1), fresh(tok, 2)
    with pytest.raises(ValueError, match="needs a head map"):
        distill.distill(student, teacher, None, *items, CFG, tmp_path, progress=False)
    with pytest.raises(ValueError, match="every loss weight is 0"):
        distill.DistillConfig(ce_weight=0.0)
    with pytest.raises(ValueError, match="cannot fill one batch"):
        distill.distill(student, teacher, head_map(), items[0].select(range(4)), items[1], CFG,
                        tmp_path / "x", progress=False)
    with pytest.raises(ValueError, match="position columns"):
        distill.distill(student, teacher, head_map().at("pos_nowhere"), *items, CFG, tmp_path / "y",
                        progress=False)
    distill.distill(student, teacher, head_map(), *items, CFG, tmp_path / "a", progress=False)
    with pytest.raises(RunFolderError, match=r"other settings \(lr: .* there, 0.001 now\)"):
        distill.distill(fresh(tok, 1), teacher, head_map(), *items, replace(CFG, lr=1e-3),
                        tmp_path / "a", progress=False)
    # the same config on another student, or with other heads, is not silently resumed
    with pytest.raises(ValueError, match="another student, teacher, head set or training set"):
        distill.distill(fresh(tok, 3), teacher, head_map(), *items, CFG, tmp_path / "a",
                        progress=False)
    with pytest.raises(ValueError, match="another student, teacher, head set or training set"):
        distill.distill(fresh(tok, 1), teacher, head_map(), *items, CFG, tmp_path / "a",
                        heads=[Head(0, 0)], progress=False)
    # a finished run is not resumed (and relabelled) on other training items
    other = items[0].select(range(len(items[0]) - 1))
    with pytest.raises(ValueError, match="another student, teacher, head set or training set"):
        distill.distill(fresh(tok, 1), teacher, head_map(), other, items[1], CFG, tmp_path / "a",
                        progress=False)
    # a run saved by an earlier cdist (its fingerprints two float sums) is named as such
    state_path = tmp_path / "a" / "state.pt"
    state = torch.load(state_path, weights_only=False)
    state["identity"]["student"] = [1.0, 2.0]
    torch.save(state, state_path)
    with pytest.raises(RunFolderError, match="saved by an earlier cdist"):
        distill.distill(fresh(tok, 1), teacher, head_map(), *items, CFG, tmp_path / "a",
                        progress=False)


def plain_z(model, item, head, column):
    """A head's z at one item's own position, from an unpadded single-prompt cache (the slow
    twin)."""
    _, cache = model.run_with_cache(torch.tensor([item["input_ids"]]))
    return cache[hook_z(head.layer)][0, item[column], head.head]


PLACED = [HeadPair(Head(1, 0), Head(0, 1), "pos_prev_label", "pos_prev_label"),
          HeadPair(Head(1, 3), Head(1, 2), "pos_last", "pos_query_label")]


def placed_map():
    return matching.HeadMap(tuple(PLACED), tuple(TRAIN), (Head(0, 1), Head(1, 2)),
                            torch.zeros(2, 2), "distance", "manual")


def test_each_pair_is_read_at_its_own_positions(tok, items, tmp_path):
    """The per-pair validation CKA at step 0 equals a plain loop over items, each read at the
    pair's columns."""
    student, teacher = fresh(tok, 1), fresh(tok, 2)
    out = distill.distill(student, teacher, placed_map(), *items, replace(CFG, steps=1), tmp_path,
                          progress=False)
    eval_items = items[1]
    with torch.no_grad():
        for pair, got in zip(PLACED, out["metrics"][0]["cka_val"], strict=True):
            x = torch.stack([plain_z(fresh(tok, 1), it, pair.student, pair.student_position)
                             for it in eval_items])
            y = torch.stack([plain_z(teacher, it, pair.teacher, pair.teacher_position)
                             for it in eval_items])
            assert got == pytest.approx(float(linear_cka(x, y, debiased=True)), abs=1e-4)
    # one column for every pair instead
    at_last = distill.distill(fresh(tok, 1), teacher, placed_map(), *items,
                              replace(CFG, steps=1, cka_position="pos_last"), tmp_path / "last",
                              progress=False)
    assert [p["teacher_position"] for p in at_last["pairs"]] == ["pos_last", "pos_last"]
    assert at_last["metrics"][0]["cka_val"] != out["metrics"][0]["cka_val"]


@pytest.mark.parametrize("shuffle", [False, True])
def test_the_shuffled_control_permutes_the_teachers_rows(tok, items, tmp_path, shuffle):
    """The CKA term of the first step, recomputed by a plain loop on the first batch: with the
    teacher's rows in item order, or permuted by the step's permutation (which is not the
    identity)."""
    cfg = replace(CFG, steps=1, eval_every=1, shuffle_teacher=shuffle, seed=4)
    out = distill.distill(fresh(tok, 1), fresh(tok, 2), placed_map(), *items, cfg, tmp_path,
                          progress=False)
    columns = ["pos_prev_label", "pos_query_label"]
    pad = evaluate.pad_id(fresh(tok, 1))
    first = next(distill._batches(items[0], cfg.batch_size, cfg.seed, pad, columns))
    order = [items[0]["input_ids"].index(list(row[: int(n)]))
             for row, n in zip(first["input_ids"].tolist(), first["length"], strict=True)]
    perm = (distill._permutation(cfg.batch_size, cfg.seed, 0) if shuffle
            else torch.arange(cfg.batch_size))
    assert shuffle == (not torch.equal(perm, torch.arange(cfg.batch_size)))
    student, teacher = fresh(tok, 1), fresh(tok, 2)
    want = []
    with torch.no_grad():
        for pair in PLACED:
            x = torch.stack([plain_z(student, items[0][i], pair.student, pair.student_position)
                             for i in order])
            y = torch.stack([plain_z(teacher, items[0][i], pair.teacher, pair.teacher_position)
                             for i in order])
            want.append(float(linear_cka(x, y[perm])))
    assert out["metrics"][1]["cka_mean"] == pytest.approx(sum(want) / len(want), abs=1e-4)
    assert not torch.equal(distill._permutation(8, 4, 0), distill._permutation(8, 4, 1))


def test_gradient_ratio_and_validation_ce_are_logged(tok, items, tmp_path):
    cfg = replace(CFG, steps=2, eval_every=1, cka_weight=0.5)
    out = distill.distill(fresh(tok, 1), fresh(tok, 2), placed_map(), *items, cfg, tmp_path,
                          progress=False)
    for row in out["metrics"]:
        assert row["grad_ce"] > 0 and row["grad_cka"] > 0
        assert row["grad_ratio"] == pytest.approx(0.5 * row["grad_cka"] / row["grad_ce"])
        assert row["val_ce"] > 0 and len(row["cka_val"]) == 2
    # a head map with cka_weight 0 is monitored without entering the loss
    ce_only = distill.distill(fresh(tok, 1), fresh(tok, 2), placed_map(), *items,
                              replace(cfg, cka_weight=0.0), tmp_path / "ce", progress=False)
    assert ce_only["metrics"][0]["grad_ratio"] == 0.0 and ce_only["metrics"][0]["cka_val"]
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "grad_ratio" in header and "cka_val" not in header and "cka_val_mean" in header


@pytest.mark.parametrize("change, message", [
    ({"steps": 0}, "steps"), ({"steps": -5}, "steps"), ({"eval_every": 0}, "eval_every"),
    ({"batch_size": 0}, "batch_size"), ({"batch_size": 1}, "batch_size"),
    ({"cka_weight": -1.0}, "loss weights"), ({"ce_weight": -0.5}, "loss weights"),
    ({"kd_temperature": 0.0}, "kd_temperature"), ({"kd_temperature": -1.0}, "kd_temperature"),
    ({"lr": float("nan")}, "finite number"), ({"lr": float("inf")}, "finite number"),
    ({"lr": 0.0}, "lr > 0"), ({"seed": None}, "whole number"), ({"seed": "abc"}, "whole number"),
    ({"seed": 1.5}, "whole number"), ({"steps": True}, "whole number"),
    ({"kv_policy": "all"}, "kv_policy"), ({"cka_position": "last"}, "position column"),
])
def test_every_setting_is_checked_where_the_config_is_made(change, message):
    from cdist.errors import ConfigError

    # the suite's type checker would refuse the wrong types first; the config's own check is
    # what a user meets
    with unchecked(), pytest.raises(ConfigError, match=message) as caught:
        replace(CFG, **change)
    assert "\n" not in str(caught.value)


def test_a_step_whose_loss_is_not_finite_is_refused_before_it_is_applied(tok, items, tmp_path):
    """A teacher whose logits overflow (one inf in its unembedding bias) makes the KD term NaN; the
    run stops at that step, before the optimizer takes it: the student keeps its own weights and
    no checkpoint of NaN weights is written."""
    from cdist.errors import NumericsError

    student, teacher = fresh(tok, 1), fresh(tok, 2)
    with torch.no_grad():
        teacher.unembed.b_U[5] = float("inf")
    before = snapshot(student)
    cfg = replace(CFG, kd_weight=1.0, eval_every=1)
    with pytest.raises(NumericsError, match=r"step 1: the loss is not finite .*kd nan"):
        distill.distill(student, teacher, head_map(), *items, cfg, tmp_path, progress=False)
    assert all(torch.equal(p, before[n]) for n, p in snapshot(student).items())
    assert not (tmp_path / "state.pt").exists()


def test_a_teacher_of_another_tokenizer_is_refused(tok, items, tmp_path):
    from cdist import tasks
    from cdist.errors import MismatchError
    from cdist.tokenizers import word_tokenizer

    words = tasks.organism_vocabulary()
    other = word_tokenizer([*words[1:], words[0]])
    teacher = new_llama(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_mlp=64,
                        vocab_size=len(other), seed=2, tokenizer=other).eval()
    with pytest.raises(MismatchError, match="tokenizers differ: vocabularies"):
        distill.distill(fresh(tok, 1), teacher, head_map(), *items, CFG, tmp_path,
                        progress=False)
    small = new_llama(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_mlp=64,
                      vocab_size=len(tok) - 10, seed=2).eval()
    with pytest.raises(MismatchError, match="output tokens"):
        distill.distill(fresh(tok, 1), small, head_map(), *items, CFG, tmp_path, progress=False)
    assert not (tmp_path / "state.pt").exists()
