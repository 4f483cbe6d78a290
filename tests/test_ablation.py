"""Mean ablation on a tiny random GQA Llama: batched scan vs its slow twin, and exact invariants
of hook_z."""

from __future__ import annotations

import math

import einops
import pytest
import torch
from conftest import Kill

from cdist import tasks
from cdist.discovery import ablation, circuit_eval, engine
from cdist.discovery.engine import clean_run
from cdist.evaluate import answer_stats
from cdist.models import hook_attn_out, hook_z
from cdist.records import read_record, write_record
from cdist.types import Ablation, Circuit, Head, HeadScores


@pytest.fixture(scope="module")
def data(tok):
    return tasks.entity_tracking(12, tokenizer=tok, n_boxes=3, template="compact", seed=1)


@pytest.fixture(scope="module")
def reference(tok):
    return tasks.entity_tracking(20, tokenizer=tok, n_boxes=3, template="compact", seed=2)


@pytest.fixture(scope="module")
def means(model, reference):
    return ablation.head_means(model, reference, batch_size=7)


@pytest.fixture(scope="module")
def ids(data):
    return torch.tensor(data["input_ids"])  # compact 3-box prompts all have one length


def attn_out(model, ids, layer, hooks=()):
    names = [hook_z(layer), hook_attn_out(layer)]
    with torch.no_grad(), model.hooks(fwd_hooks=list(hooks)):
        _, cache = model.run_with_cache(ids, names_filter=names)
    return cache[names[0]], cache[names[1]]


# ---- vocabulary ----------------------------------------------------------------------------------


def test_head_prints_parses_and_orders():
    head = Head(3, 5)
    assert str(head) == "a3.h5" and Head.parse("a3.h5") == head
    assert Head.parse(str(Head(12, 0))) == Head(12, 0)
    assert sorted([Head(1, 0), Head(0, 7), Head(0, 2)]) == [Head(0, 2), Head(0, 7), Head(1, 0)]
    kv_heads = [Head(0, h).kv_head(n_heads=8, n_kv_heads=2) for h in range(8)]
    assert kv_heads == [0, 0, 0, 0, 1, 1, 1, 1]
    assert head.kv_head(8, None) == 5
    for bad in ("L3H5", "a3.h", "a-1.h2"):
        with pytest.raises(ValueError, match="a<layer>.h<head>"):
            Head.parse(bad)
    assert Ablation("mean") is Ablation.MEAN


def test_circuit_json_round_trip(tmp_path):
    circuit = Circuit(
        {"value_fetcher": (Head(1, 2), Head(0, 3)), "position_detector": ("a0.h1", "a1.h2")},
        positions={"position_detector": "pos_query_label"},
        scores={Head(1, 2): -0.5, "a0.h3": -0.25},
        model="et-teacher",
        method="path_patching",
    )
    assert circuit.heads == (Head(0, 1), Head(0, 3), Head(1, 2)) and len(circuit) == 3
    assert circuit.positions == {"value_fetcher": "pos_last",
                                 "position_detector": "pos_query_label"}
    assert read_record(Circuit, write_record(circuit, tmp_path / "c.json")) == circuit
    assert read_record(Circuit, tmp_path / "c.json") == circuit
    assert read_record(Circuit, str(tmp_path / "c.json")) == circuit


def test_head_scores_top():
    scores = HeadScores(torch.tensor([[0.1, 0.5], [float("nan"), 0.5]]), metric="prob_drop")
    assert scores.top(3) == (Head(0, 1), Head(1, 1), Head(0, 0)) and scores[Head(0, 1)] == 0.5
    lower_first = HeadScores(-scores.scores, "relative_change", higher_is_important=False)
    assert lower_first.top(1) == (Head(0, 1),)


# ---- TransformerLens invariants the ablation relies on -------------------------------------------


def test_head_outputs_sum_to_attn_out(model, ids):
    for layer in range(model.cfg.n_layers):
        z, out = attn_out(model, ids, layer)
        attn = model.blocks[layer].attn
        per_head = einops.einsum(z, attn.W_O,
                                 "batch pos head_index d_head, head_index d_head d_model"
                                 " -> batch pos d_model")
        torch.testing.assert_close(per_head + attn.b_O, out, atol=1e-5, rtol=1e-5)


# ---- mean ablation -------------------------------------------------------------------------------


def test_empty_ablation_changes_nothing(model, ids, means):
    with torch.no_grad():
        clean = model(ids)
        assert torch.equal(ablation.ablated_logits(model, ids, set(), means), clean)
        no_heads = torch.zeros(model.cfg.n_heads, dtype=torch.bool)
        with model.hooks(fwd_hooks=[ablation.make_mean_ablation_hook(0, no_heads, means)]):
            assert torch.equal(model(ids), clean)


def test_ablating_all_heads_of_a_layer_leaves_mean_output(model, ids, means):
    attn = model.blocks[0].attn
    hooks = ablation.mean_ablation_hooks([Head(0, h) for h in range(4)], means)
    z, out = attn_out(model, ids, 0, hooks)
    mean_per_head = einops.einsum(means[0, : ids.shape[1]], attn.W_O,
                                  "pos head_index d_head, head_index d_head d_model -> pos d_model")
    expected = mean_per_head + attn.b_O
    torch.testing.assert_close(out, expected.expand_as(out), atol=1e-5, rtol=1e-5)


def test_ablation_at_one_position_only_touches_that_position(model, ids, data, means):
    last = torch.tensor(data["pos_last"])
    clean_z, _ = attn_out(model, ids, 0)
    hook = ablation.make_mean_ablation_hook(0, [2], means, positions=last)
    z, _ = attn_out(model, ids, 0, [hook])
    rows = torch.arange(len(ids))
    torch.testing.assert_close(z[rows, last, 2], means[0, last, 2])
    z[rows, last, 2] = clean_z[rows, last, 2]
    assert torch.equal(z, clean_z)


def test_mean_ablation_keeps_the_reference_mean(model, reference, means):
    head = Head(0, 1)
    with model.hooks(fwd_hooks=ablation.mean_ablation_hooks([head], means)):
        ablated_means = ablation.head_means(model, reference, batch_size=64)
    torch.testing.assert_close(ablated_means[0], means[0], atol=1e-6, rtol=1e-6)  # layer 1 may move


def test_means_ignore_padding_and_cover_the_longest_prompt(model, tok):
    # Theory-of-mind stories differ in length: each position's mean is over the prompts that
    # reach it.
    stories = tasks.theory_of_mind(30, tokenizer=tok, template="compact", seed=4)
    lengths = [len(x) for x in stories["input_ids"]]
    means = ablation.head_means(model, stories, batch_size=3)
    assert means.shape == (2, max(lengths), 4, 8)
    longest = stories.select([i for i, n in enumerate(lengths) if n == max(lengths)])
    shorter = max(n for n in lengths if n < max(lengths))
    alone = ablation.head_means(model, longest)
    # only the longest reach there
    torch.testing.assert_close(means[:, shorter:], alone[:, shorter:])
    too_long = torch.zeros(1, max(lengths) + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="at least as long"):
        ablation.ablated_logits(model, too_long, [Head(0, 0)], means)


@pytest.mark.parametrize("position", [None, "pos_query_label"])
def test_batched_scan_matches_the_one_head_loop(model, data, means, position):
    # accuracy 1 before ablation, so accuracy drops are not all zero
    data = teacher_labelled(model, data)
    fast = ablation.head_ablation_scan(model, data, means=means, batch_size=5, heads_per_pass=3,
                                       position=position)
    slow = ablation.head_ablation_scan_reference(model, data, means=means, position=position)
    metrics = {"prob_drop", "prob_ablated", "accuracy_drop", "accuracy_ablated"}
    assert set(fast.metrics) == set(slow.metrics) == metrics
    expected = ("mean_ablation", "prob_drop", position, len(data))
    assert (fast.method, fast.metric, fast.position, fast.n_items) == expected
    for key in fast.metrics:
        assert fast[key].shape == (2, 4)
        torch.testing.assert_close(fast[key], slow[key], atol=1e-5, rtol=0)
    # it measured something
    assert fast["prob_drop"].abs().max() > 0 and fast["accuracy_drop"].max() > 0


def test_the_scan_reports_progress_pass_by_pass(model, data, means, capsys, monkeypatch):
    """In a log the scan counts forward passes (a batch of a deep model is minutes of them):
    2 layers of 4 heads, 3 per pass, is 2 + 2 passes a batch, 3 batches of 5 of 12 items."""
    monkeypatch.setattr("sys.stderr.isatty", lambda: False, raising=False)
    ablation.head_ablation_scan(model, data, means=means, batch_size=5, heads_per_pass=3,
                                progress=True)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "mean-ablation scan: 12 passes"
    assert lines[1].startswith("mean-ablation scan: 1/12 passes, ")
    assert lines[-1].startswith("mean-ablation scan: done, 12/12 passes, ")


def test_a_killed_scan_resumes_from_its_last_batch_bit_for_bit(model, data, means, tmp_path,
                                                                monkeypatch, capsys):
    """Killed in its third batch, the scan keeps the sums of two; called again it runs only the
    last and ends with the uninterrupted scan's float64 sums exactly. Other items start over; so
    does a file that is not the scan's (an edit, damaged bytes)."""
    data = teacher_labelled(model, data)
    kept = tmp_path / "scan.partial.pt"
    left = tmp_path / "scan.partial.pt.rank1"  # a torchrun's, under another layout of processes
    left.write_bytes(b"")
    kill = Kill(monkeypatch, ablation, "one_head_scan")
    real_sums, sums = ablation._ablation_scan, []

    def recorded(value, correct, *args):
        sums.append((value, correct))  # the float64 sums, before the scores' float32
        return real_sums(value, correct, *args)

    monkeypatch.setattr(ablation, "_ablation_scan", recorded)

    def scan(items=data, resume=kept, progress=False):
        return ablation.head_ablation_scan(model, items, means=means, batch_size=5,
                                           heads_per_pass=3, resume=resume, progress=progress)

    def same(a, b):
        return all(torch.equal(x, y) for x, y in zip(a[0] + a[1], b[0] + b[1], strict=True))

    straight = scan(resume=None)
    kill.stop(scan, 3)
    assert torch.load(kept, weights_only=True)["done"] == 2
    monkeypatch.setattr("sys.stderr.isatty", lambda: False, raising=False)
    capsys.readouterr()
    resumed = scan(progress=True)
    assert kill.calls == [2]  # the last batch (12 items in batches of 5) alone
    assert same(sums[-1], sums[0]) and len(sums) == 2
    for key in straight.metrics:
        assert torch.equal(resumed[key], straight[key]), key
    assert (resumed.n_items, resumed.metric) == (straight.n_items, straight.metric)
    # 2 layers of 4 heads, 3 a pass: 4 passes a batch, 8 of 12 already done
    assert capsys.readouterr().err.splitlines()[0] == "mean-ablation scan: 12 passes, from 8"
    assert not kept.exists() and not left.exists()  # removed once the scan is made

    # sums kept for other items are not theirs: that scan starts over
    kill.stop(scan, 2)
    other = data.select(range(11, -1, -1))
    scan(other)
    assert kill.calls == [5, 5, 2]
    scan(other, resume=None)
    assert same(sums[-1], sums[-2])

    for damaged in (b"not a checkpoint", b"\x80\x02X\x01", b"\x80\x02h\x05.", b"\x80"):
        kept.write_bytes(damaged)
        kill.calls.clear()
        scan()
        assert kill.calls == [5, 5, 2] and same(sums[-1], sums[0]) and not kept.exists()


def test_position_drops_resume_from_their_last_batch_bit_for_bit(model, data, means, tmp_path,
                                                                 monkeypatch):
    """Where heads work (every column in one pass over the items) is as resumable as the scan."""
    kept, kill = tmp_path / "where.partial.pt", Kill(monkeypatch, ablation, "_batch_sums")
    heads, columns = [Head(1, 2), Head(0, 3)], ["pos_last", "pos_query_label"]


    def drops(resume=kept):
        return ablation.position_drops(model, data, heads, means, columns, batch_size=5,
                                       heads_per_pass=1, resume=resume)

    cleans = []
    for module in (ablation, engine):  # the shared run, and any a column would make of its own
        monkeypatch.setattr(module, "clean_run",
                            lambda *a, **k: cleans.append(1) or clean_run(*a, **k))
    straight = drops(resume=None)
    assert straight.shape == (2, 2) and straight.dtype == torch.float64
    assert len(cleans) == 3  # one clean run a batch (12 items in batches of 5), for both columns
    for j, column in enumerate(columns):  # the scan at that column, for those heads
        scan = ablation.head_ablation_scan(model, data, means=means, position=column)
        for i, h in enumerate(heads):
            assert float(straight[j, i]) == pytest.approx(float(scan["prob_drop"][h.layer, h.head]),
                                                          abs=1e-6)
    kill.stop(drops, 5)  # the third batch's first column (two calls a batch)
    assert torch.load(kept, weights_only=True)["done"] == 2
    assert torch.equal(drops(), straight) and kill.calls == [2, 2] and not kept.exists()


def teacher_labelled(model, data):
    """``data`` answered by the model itself (as distillation labels are), so that its accuracy
    is 1."""
    from cdist import evaluate

    answers = evaluate.predictions(model, data).tolist()
    return data.remove_columns("answer_id").add_column("answer_id", answers)


def test_full_circuit_is_perfectly_faithful(model, data, means):
    labelled = teacher_labelled(model, data)
    everything = [Head(layer, h) for layer in range(2) for h in range(4)]
    result = circuit_eval.evaluate_circuit(model, everything, labelled, means=means, n_random=2)
    assert result["full_accuracy"] == result["circuit_accuracy"] == result["random_accuracy"] == 1.0
    assert result["faithfulness"] == 1.0 and result["n_circuit_heads"] == result["n_heads"] == 8
    assert torch.equal(result["full_correct"], result["circuit_correct"])


def test_circuit_evaluation(model, data, means):
    labelled = teacher_labelled(model, data)
    circuit = Circuit({"movers": (Head(1, 0), Head(1, 3)), "detectors": (Head(0, 2),)},
                      positions={"detectors": "pos_query_label"})
    ids = torch.tensor(labelled["input_ids"])
    others = [Head(layer, h) for layer in range(2) for h in range(4)
              if Head(layer, h) not in circuit.heads]
    torch.testing.assert_close(circuit_eval.circuit_logits(model, ids, circuit.heads, means),
                               ablation.ablated_logits(model, ids, others, means))
    a = circuit_eval.evaluate_circuit(model, circuit, labelled, means=means, n_random=3, seed=7)
    b = circuit_eval.evaluate_circuit(model, circuit.heads, labelled, means=means, n_random=3,
                                      seed=7)
    assert a["circuit_accuracy"] == b["circuit_accuracy"]
    assert a["random_accuracies"] == b["random_accuracies"]
    assert a["faithfulness"] == pytest.approx(a["circuit_accuracy"])
    assert len(a["random_accuracies"]) == 3
    wrong = labelled.remove_columns("answer_id").add_column("answer_id", [0] * len(labelled))
    unfaithful = circuit_eval.evaluate_circuit(model, circuit, wrong, means=means, n_random=1)
    assert math.isnan(unfaithful["faithfulness"])


def test_circuit_kept_only_at_its_positions(model, data, means):
    """``keep_at`` keeps each circuit head at its own positions only, as a plain indexing hook
    does, and ``keep_at_positions`` builds it from the circuit's groups."""
    labelled = teacher_labelled(model, data)
    circuit = Circuit({"movers": (Head(1, 0), Head(1, 3)), "detectors": (Head(0, 2),)},
                      positions={"detectors": "pos_query_label"})
    ids = torch.tensor(labelled["input_ids"])
    answer, last = torch.tensor(labelled["answer_id"]), torch.tensor(labelled["pos_last"])
    query = torch.tensor(labelled["pos_query_label"])
    where = {Head(1, 0): last, Head(1, 3): last, Head(0, 2): query}
    rows = torch.arange(len(ids))

    def ablate_all_but_the_circuit_at(layer):
        def hook(z, hook):
            out = means[layer, : z.shape[1]].expand_as(z).clone()
            for h, at in where.items():
                if h.layer == layer:
                    out[rows, at, h.head] = z[rows, at, h.head]
            return out

        return hook_z(layer), hook

    with torch.no_grad():
        with model.hooks(fwd_hooks=[ablate_all_but_the_circuit_at(layer) for layer in range(2)]):
            by_hand = model(ids)
        keep_at = {h: [at] for h, at in where.items()}
        kept = circuit_eval.circuit_logits(model, ids, circuit.heads, means, keep_at=keep_at)
        everywhere = circuit_eval.circuit_logits(model, ids, circuit.heads, means)
    torch.testing.assert_close(kept, by_hand, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the one-position path reads the same logits
        at_last = circuit_eval.circuit_logits(model, ids, circuit.heads, means, keep_at=keep_at,
                                          pos=last)
    assert at_last.shape == (len(ids), model.cfg.d_vocab)
    torch.testing.assert_close(at_last, by_hand[rows, last], atol=1e-5, rtol=1e-5)
    # The restriction bites: keeping the heads everywhere gives other logits.
    assert not torch.allclose(kept[rows, last], everywhere[rows, last], atol=1e-3)
    strict = circuit_eval.evaluate_circuit(model, circuit, labelled, means=means, n_random=1,
                                       keep_at_positions=True)
    correct = answer_stats(by_hand, answer, last)[1]
    assert torch.equal(strict["circuit_correct"], correct.bool())
    assert strict["circuit_accuracy"] == correct.float().mean().item()


def test_heads_outside_the_model_are_refused(model, tok):
    from cdist.activations import head_z_dataset
    from cdist.errors import InputError

    items = tasks.entity_tracking(8, tokenizer=tok, n_boxes=3, template="compact", seed=0)
    means = ablation.head_means(model, items)
    bad = [Head(0, 0), Head(9, 99)]
    with pytest.raises(InputError, match=r"a9\.h99 are outside the model"):
        circuit_eval.evaluate_circuit(model, bad, items, means=means, n_random=1)
    with pytest.raises(InputError, match="outside the model"):
        head_z_dataset(model, items, [Head(model.cfg.n_layers, 0)])
