"""Path, activation and attribution patching on a tiny random three-layer GQA Llama.

The batched scans are held to their one-sender-one-prompt twins, activation patching to
TransformerLens's own ``transformer_lens.patching`` helper, and attribution patching to a finite
difference.
"""

from __future__ import annotations

import pytest
import torch
from conftest import Kill, unchecked

from cdist import tasks
from cdist.discovery import activation_patching, attribution_patching, circuits, path_patching
from cdist.discovery import search as et_search
from cdist.evaluate import answer_stats
from cdist.models import hook_z
from cdist.records import read_record, write_record
from cdist.store import Store
from cdist.types import Circuit, Head, HeadScores, Scan

TOL = 1e-5


@pytest.fixture(scope="module")
def data(tok):
    return tasks.entity_tracking(5, tokenizer=tok, n_boxes=3, template="compact", seed=4)


def close(a, b, tol=TOL):
    assert a.shape == b.shape
    assert torch.allclose(a, b, atol=tol, rtol=tol), (a - b).abs().max()


@pytest.mark.parametrize(
    "receivers, receiver_input, position",
    [
        ((), "q", "pos_last"),
        ((Head(2, 1), Head(1, 3)), "q", "pos_last"),
        ((Head(2, 0), Head(2, 3)), "k", "pos_query_label"),
        ((Head(2, 2),), "v", "pos_prev_label"),
    ],
)
def test_batched_path_patching_matches_the_one_sender_loop(model3, data, receivers, receiver_input,
                                                           position):
    kw = dict(receivers=receivers, receiver_input=receiver_input, position=position)
    fast = path_patching.path_patching_scan(model3, data, batch_size=2, senders_per_pass=3, **kw)
    slow = path_patching.path_patching_scan_reference(model3, data, **kw)
    close(fast["relative_change"], slow["relative_change"])
    close(fast["prob_change"], slow["prob_change"])
    assert fast["relative_change"].abs().max() > 1e-3  # the scan measured something


def test_senders_that_cannot_reach_a_receiver_score_zero(model3, data):
    out = path_patching.path_patching_scan(model3, data, receivers=[Head(1, 0)], receiver_input="q")
    assert torch.all(out["relative_change"][1:] == 0)
    assert torch.any(out["relative_change"][0] != 0)


def test_key_value_receivers_are_groups(model3, data):
    """Query heads 0 and 1 share key/value head 0: as k or v receivers they are one and the same
    group."""
    for receiver_input in ("k", "v"):
        a = path_patching.path_patching_scan(model3, data, receivers=[Head(2, 0)],
                                             receiver_input=receiver_input,
                                             position="pos_query_label")
        b = path_patching.path_patching_scan(model3, data, receivers=[Head(2, 1)],
                                             receiver_input=receiver_input,
                                             position="pos_query_label")
        assert torch.equal(a["relative_change"], b["relative_change"])
    q0 = path_patching.path_patching_scan(model3, data, receivers=[Head(2, 0)], receiver_input="q")
    q1 = path_patching.path_patching_scan(model3, data, receivers=[Head(2, 1)], receiver_input="q")
    assert not torch.allclose(q0["relative_change"], q1["relative_change"])


def test_last_layer_path_to_logits_is_activation_patching(model3, data):
    """A last-layer sender has no later heads to freeze, so its path to the logits is its whole
    effect."""
    path = path_patching.path_patching_scan(model3, data, position="pos_last")
    act = activation_patching.activation_patching_scan(model3, data, position="pos_last")
    close(path["relative_change"][-1], act["relative_change"][-1])
    assert not torch.allclose(path["relative_change"][0], act["relative_change"][0], atol=1e-4)


@pytest.mark.parametrize("position", [None, "pos_last", "pos_query_label"])
def test_batched_activation_patching_matches_the_one_head_loop(model3, data, position):
    fast = activation_patching.activation_patching_scan(model3, data, position=position,
                                                        batch_size=2, heads_per_pass=5)
    slow = activation_patching.activation_patching_scan_reference(model3, data, position=position)
    close(fast["relative_change"], slow["relative_change"])
    close(fast["prob_change"], slow["prob_change"])
    assert fast["prob_change"].abs().max() > 1e-4  # the scan measured something


def test_activation_patching_agrees_with_transformer_lens(model3, data):
    from transformer_lens import patching as tl_patching

    clean = torch.tensor(data["input_ids"])
    corrupt = torch.tensor(data["corrupt_input_ids"])
    answer, last = torch.tensor(data["answer_id"]), torch.tensor(data["pos_last"])

    def mean_prob(logits):
        return answer_stats(logits, answer, last)[0].mean()

    # TransformerLens runs its first argument and patches in activations from the cache it is given.
    _, corrupt_cache = model3.run_with_cache(corrupt)
    theirs = tl_patching.get_act_patch_attn_head_out_all_pos(model3, clean, corrupt_cache,
                                                             mean_prob)
    with torch.no_grad():
        base = mean_prob(model3(clean))
    ours = activation_patching.activation_patching_scan(model3, data)["prob_change"].double() + base
    close(ours, theirs.double())


@pytest.fixture(scope="module")
def uneven(tok):
    """Theory-of-mind stories of two lengths, interleaved so that every batch of them is padded."""
    stories = tasks.theory_of_mind(30, tokenizer=tok, template="compact", seed=4)
    lengths = [len(ids) for ids in stories["input_ids"]]
    longest = [i for i, n in enumerate(lengths) if n == max(lengths)]
    shortest = [i for i, n in enumerate(lengths) if n == min(lengths)]
    assert longest and shortest and max(lengths) > min(lengths)
    pairs = zip(longest[:3], shortest[:3], strict=True)
    return stories.select([i for pair in pairs for i in pair])


@pytest.mark.parametrize("position", [None, "pos_query_character"])
def test_batched_attribution_patching_matches_the_one_head_loop(model3, uneven, position):
    fast = attribution_patching.attribution_patching_scan(model3, uneven, position=position,
                                                          batch_size=4)
    slow = attribution_patching.attribution_patching_scan_reference(model3, uneven,
                                                                    position=position)
    expected = ("attribution_patching", position, len(uneven))
    assert (fast.method, fast.position, fast.n_items) == expected
    close(fast["relative_change"], slow["relative_change"])
    close(fast["prob_change"], slow["prob_change"])
    assert fast["prob_change"].abs().max() > 1e-4  # the scan measured something


def test_attribution_patching_is_the_directional_derivative(model3, data):
    """For a layer-0 head (whose effect also runs through later heads) the estimate matches a
    finite difference."""
    est = attribution_patching.attribution_patching_scan(model3, data, batch_size=2)["prob_change"]
    clean, corrupt = torch.tensor(data["input_ids"]), torch.tensor(data["corrupt_input_ids"])
    answer, last = torch.tensor(data["answer_id"]), torch.tensor(data["pos_last"])
    name, head, eps = hook_z(0), 2, 1e-2
    with torch.no_grad():
        _, cc = model3.run_with_cache(corrupt, names_filter=[name])
        _, kc = model3.run_with_cache(clean, names_filter=[name])
        step = (cc[name] - kc[name])[:, :, head]

        def nudge(sign):
            def hook(z, hook):
                z = z.clone()
                z[:, :, head] += sign * eps * step
                return z

            with model3.hooks(fwd_hooks=[(name, hook)]):
                return answer_stats(model3(clean), answer, last)[0]

        finite = ((nudge(1) - nudge(-1)) / (2 * eps)).mean()
    # central difference, eps 1e-2
    assert abs(float(est[0, head]) - float(finite)) <= 1e-2 * abs(float(finite))
    assert est.abs().max() > 0


@pytest.mark.parametrize(
    "receivers, receiver_input, position",
    [
        ((), "q", "pos_last"),
        ((Head(2, 1), Head(1, 3)), "q", "pos_last"),
        ((Head(2, 0),), "k", "pos_query_label"),
        ((Head(2, 2),), "v", "pos_prev_label"),
    ],
)
def test_path_attribution_is_the_derivative_of_path_patching(model3, data, receivers,
                                                             receiver_input, position):
    """The batched first-order estimate equals the derivative of the plain path-patching twin along
    z_clean + t (z_corrupt - z_clean)."""
    kw = dict(receivers=receivers, receiver_input=receiver_input, position=position)
    fast = attribution_patching.path_attribution_scan(model3, data, batch_size=2, **kw)
    slow = attribution_patching.path_attribution_scan_reference(model3, data, **kw)
    close(fast["prob_change"], slow["prob_change"])
    close(fast["relative_change"], slow["relative_change"])
    assert fast.receivers == tuple(sorted(receivers))
    assert fast["relative_change"].abs().max() > 1e-5  # the estimate measured something


def test_receivers_in_the_first_layer_have_no_senders(model3, data):
    kw = dict(receivers=[Head(0, 1)], receiver_input="v", position="pos_query_label")
    estimate = attribution_patching.path_attribution_scan(model3, data, **kw)
    exact = path_patching.path_patching_scan(model3, data, **kw)
    assert not estimate["relative_change"].any() and not exact["relative_change"].any()


def test_path_attribution_ranks_like_path_patching(model3, data):
    """A first-order estimate, so not equal, but it must track the exact scan on a small model."""
    from cdist.stats import spearman

    exact = path_patching.path_patching_scan(model3, data)["prob_change"].flatten()
    est = attribution_patching.path_attribution_scan(model3, data)["prob_change"].flatten()
    assert spearman(exact, est) > 0.5
    assert not torch.allclose(exact, est, atol=1e-6)


def test_scans_of_some_heads_leave_the_others_nan(model3, data):
    some = [Head(0, 1), Head(1, 3), Head(2, 2)]
    full = path_patching.path_patching_scan(model3, data)
    part = path_patching.path_patching_scan(model3, data, senders=some, senders_per_pass=2)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    for h in some:
        mask[h.layer, h.head] = True
    for metric in ("relative_change", "prob_change", "relative_change_se"):
        close(part[metric][mask], full[metric][mask])
        assert torch.isnan(part[metric][~mask]).all()
    assert part.ranking().top(3) == tuple(sorted(some, key=lambda h: full.ranking()[h]))
    act_full = activation_patching.activation_patching_scan(model3, data)
    act = activation_patching.activation_patching_scan(model3, data, heads=["a1.h3", "a2.h2"])
    close(act["prob_change"][1, 3], act_full["prob_change"][1, 3])
    assert torch.isnan(act["prob_change"][0]).all()
    with pytest.raises(ValueError, match="a9.h0 is not in a model of 3 layers x 4 heads"):
        path_patching.path_patching_scan(model3, data, senders=[Head(9, 0)])


def test_standard_errors_are_those_of_the_items(model3, data):
    """relative_change_se is the standard error of the mean of the per-item relative changes."""
    scan = path_patching.path_patching_scan(model3, data, receivers=[Head(2, 1)])
    per_item = torch.stack([
        path_patching.path_patching_scan(model3, data.select([i]), receivers=[Head(2, 1)])[
            "relative_change"] for i in range(len(data))])
    expected = per_item.double().std(0, unbiased=True) / len(data) ** 0.5
    close(scan["relative_change_se"], expected.float(), tol=1e-4)
    assert scan["relative_change_se"][0].min() > 0
    single = path_patching.path_patching_scan(model3, data.select([0]))
    assert torch.isnan(single["relative_change_se"]).all()


def test_a_memory_budget_sets_the_batch_and_changes_no_score(model3, data, monkeypatch):
    from cdist.discovery import ablation, engine

    n_pos = max(len(ids) for ids in data["input_ids"])
    row = engine.row_bytes(model3, n_pos)
    _, cache = model3.run_with_cache(torch.tensor(data["input_ids"][:2]))
    # every hooked activation of a pass counted, per row
    assert row >= sum(t.nbytes for t in cache.values()) / 2
    assert engine.row_bytes(model3, 2 * n_pos) > row
    small, big = (engine.budget_batch_size(model3, data, 4, gib) for gib in (1e-6, 100.0))
    assert (small, big) == (1, len(data))
    gib = 3.5 * (4 * row) / 2**30  # room for about three items of four rows each
    fits = engine.budget_batch_size(model3, data, 4, gib)
    assert 1 < fits < len(data) and fits * 4 * row <= gib * 2**30
    with pytest.raises(ValueError, match="memory_budget=0"):
        engine.budget_batch_size(model3, data, 4, 0)
    means = ablation.head_means(model3, data)
    scans = [
        (lambda **kw: path_patching.path_patching_scan(model3, data, senders_per_pass=4, **kw)),
        (lambda **kw: activation_patching.activation_patching_scan(model3, data, heads_per_pass=4,
                                                                   **kw)),
        (lambda **kw: ablation.head_ablation_scan(model3, data, means=means, heads_per_pass=4,
                                                  **kw)),
    ]
    sizes = []
    for module in (path_patching, activation_patching, ablation):
        def spy(data, batch_size, *args, original=module.batches, **kw):
            sizes.append(batch_size)
            return original(data, batch_size, *args, **kw)
        monkeypatch.setattr(module, "batches", spy)
    for scan in scans:
        budgeted = scan(memory_budget=gib)
        assert sizes.pop() == fits  # the scan ran in batches of the budget's size
        fixed = scan(batch_size=len(data))
        for metric in budgeted.metrics:
            close(budgeted[metric], fixed[metric])


def test_select_heads_and_ranked_circuit():
    scores = HeadScores(torch.tensor([[-0.5, 0.1], [-0.02, -0.3]]), "relative_change",
                        higher_is_important=False)
    assert circuits.select_heads(scores, 3) == (Head(0, 0), Head(1, 1), Head(1, 0))
    assert circuits.select_heads(scores, 3, min_effect=0.1) == (Head(0, 0), Head(1, 1))
    drop = HeadScores(torch.tensor([[0.0, 0.2], [0.4, -0.1]]), "prob_drop")
    circuit = circuits.ranked_circuit(drop, 3, model="m")
    # zero and negative drops are not kept
    assert circuit.groups["circuit"] == (Head(1, 0), Head(0, 1))
    assert read_record(Circuit, write_record(circuit)) == circuit


@pytest.mark.parametrize("search", [et_search.ET_SEARCH, et_search.ET_SEARCH_ADJACENT])
def test_entity_tracking_search_builds_its_groups(model3, data, tmp_path, search):
    # five items of a random model: nothing clears the noise rule, so a fixed threshold
    circuit, found = et_search.entity_tracking_circuit(model3, data, k=2, search=search,
                                                           min_effect=0.0, model_name="random")
    assert list(circuit.groups) == [step.name for step in search]
    assert circuit.positions["position_detector"] == "pos_query_label"
    assert circuit.positions["structure_reader"] == "pos_prev_label"
    assert 1 <= len(circuit.groups["value_fetcher"]) <= 2
    for step in search[1:]:
        receivers = circuit.groups[step.receivers]
        for h in circuit.groups[step.name]:
            # a sender sits below a receiver it feeds
            assert h.layer < max(r.layer for r in receivers)
            assert found[step.name].ranking()[h] < 0
        if circuit.groups[step.name]:
            assert set(found[step.name].receivers) == set(receivers)
            assert found[step.name].receiver_input == step.receiver_input
    path = tmp_path / "circuit.json"
    write_record(circuit, path)
    assert read_record(Circuit, path) == circuit


def test_noise_rule_keeps_only_effects_beyond_two_standard_errors(model3, data):
    scan = path_patching.path_patching_scan(model3, data)
    rel, se = scan["relative_change"], scan["relative_change_se"]
    kept = circuits.select_heads(scan, 12, "noise")
    expected = {Head(layer, head) for layer in range(3) for head in range(4)
                if rel[layer, head] < -circuits.NOISE_Z * se[layer, head]}
    assert set(kept) == expected
    assert set(circuits.select_heads(scan, 12, 0.0)) > expected  # a bare sign keeps more
    # k counts heads that clear their bars: a big but noisy effect is passed over, not a slot lost
    noisy = Scan("path_patching", {"relative_change": torch.tensor([[-0.9, -0.5], [-0.3, -0.01]]),
                                   "relative_change_se": torch.tensor([[0.6, 0.1], [0.1, 0.1]])},
                 "relative_change", higher_is_important=False, n_items=8)
    assert circuits.select_heads(noisy, 2, "noise") == (Head(0, 1), Head(1, 0))
    assert circuits.select_heads(noisy, 1, "noise") == (Head(0, 1),)
    with pytest.raises(ValueError, match="2 or more items"):
        circuits.select_heads(path_patching.path_patching_scan(model3, data.select([0])), 2,
                              "noise")
    with pytest.raises(ValueError, match="needs a Scan with standard errors"):
        circuits.select_heads(scan.ranking(), 2, "noise")


def test_prefiltered_search_resumes_from_its_saved_groups(model3, data, tmp_path, monkeypatch):
    kw = dict(k=2, min_effect=0.0, prefilter=4, checkpoint_dir=tmp_path)
    circuit, found = et_search.entity_tracking_circuit(model3, data, **kw)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"{group}.json" for group, heads in circuit.groups.items()
        if group == "value_fetcher" or circuit.groups[
            next(s.receivers for s in et_search.ET_SEARCH if s.name == group)])
    fetchers = found["value_fetcher"]
    assert (~torch.isnan(fetchers["relative_change"])).sum() == 4  # only the 4 candidates ran
    candidates = set(found["value_fetcher_prefilter"].ranking().top(4))
    assert set(circuit.groups["value_fetcher"]) <= candidates
    # a second call reads the saved groups: no scan runs at all
    monkeypatch.setattr(et_search, "path_patching_scan", None)
    again, found_again = et_search.entity_tracking_circuit(model3, data, **kw)
    assert again == circuit
    assert torch.equal(found_again["value_fetcher"]["prob_change"].nan_to_num(),
                       fetchers["prob_change"].nan_to_num())
    # other settings or items are not taken for the saved ones
    with pytest.raises(TypeError):
        et_search.entity_tracking_circuit(model3, data, **(kw | {"prefilter": 5}))
    with pytest.raises(TypeError):
        et_search.entity_tracking_circuit(model3, data.select(range(4)), **kw)


def test_search_remakes_a_group_whose_kept_file_was_damaged(model3, data, tmp_path):
    kw = dict(k=2, min_effect=0.0, checkpoint_dir=tmp_path, search=et_search.ET_SEARCH[:2])
    circuit, found = et_search.entity_tracking_circuit(model3, data, **kw)
    (tmp_path / "value_fetcher.json").write_text("{not json")
    again, found_again = et_search.entity_tracking_circuit(model3, data, **kw)
    assert again == circuit
    assert torch.equal(found_again["value_fetcher"]["prob_change"],
                       found["value_fetcher"]["prob_change"])
    assert Store(tmp_path).load("value_fetcher.json", None) is None  # kept under its identity


# each resumable patching scan: its module, the function called once a batch (where the kill
# lands), and the scan with the settings of the first run or (other=True) of another
RESUMABLE = {
    "path patching": (path_patching, "_patched_chunks", lambda model, items, resume, other:
                      path_patching.path_patching_scan(
                          model, items, receivers=(Head(2, 0),) if other else (Head(2, 1),),
                          batch_size=2, senders_per_pass=3, resume=resume)),
    "activation patching": (activation_patching, "one_head_scan", lambda model, items, resume,
                            other: activation_patching.activation_patching_scan(
                                model, items, position="pos_query_label" if other else "pos_last",
                                batch_size=2, heads_per_pass=3, resume=resume)),
}


@pytest.mark.parametrize("name", RESUMABLE)
def test_a_killed_patching_scan_resumes_from_its_last_batch_bit_for_bit(
        name, model3, data, tmp_path, monkeypatch):
    """Killed in its third batch, the scan keeps two batches' sums; called again it patches only
    the third and returns the uninterrupted scan exactly. Other settings (another receiver set,
    another position) or other items start over; the file is removed once the scan is made."""
    module, killed, run = RESUMABLE[name]
    kept, kill = tmp_path / "scan.partial.pt", Kill(monkeypatch, module, killed)

    def scan(items=data, resume=kept, other=False):
        return run(model3, items, resume, other)

    straight = scan(resume=None)
    kill.stop(scan, 3)
    assert torch.load(kept, weights_only=True)["done"] == 2
    resumed = scan()
    assert kill.calls == [1]  # 5 items in batches of 2: the last batch alone
    for metric in straight.metrics:
        assert torch.equal(resumed[metric].nan_to_num(), straight[metric].nan_to_num()), metric
        assert torch.equal(resumed[metric].isnan(), straight[metric].isnan()), metric
    assert resumed.receivers == straight.receivers and not kept.exists()

    for other in (dict(other=True), dict(items=data.select([4, 3, 2, 1, 0]))):
        kill.stop(scan, 2)
        scan(**other)
        assert kill.calls == [2, 2, 1] and not kept.exists()  # started over


def test_a_search_killed_inside_a_group_resumes_that_group(model3, data, tmp_path, monkeypatch):
    kw = dict(k=2, min_effect=0.0, checkpoint_dir=tmp_path, search=et_search.ET_SEARCH[:2],
              batch_size=2)
    circuit, found = et_search.entity_tracking_circuit(model3, data, **kw)
    for name in ("value_fetcher", "position_transmitter"):
        (tmp_path / f"{name}.json").unlink()
    real, calls = path_patching._patched_chunks, []

    def killed_in_the_second_group(model, batch, paths, *args):
        calls.append(paths.receivers)
        if len(calls) == 5:  # the first group's 3 batches, then the second's second
            raise KeyboardInterrupt
        return real(model, batch, paths, *args)

    monkeypatch.setattr(path_patching, "_patched_chunks", killed_in_the_second_group)
    with pytest.raises(KeyboardInterrupt):
        et_search.entity_tracking_circuit(model3, data, **kw)
    assert (tmp_path / "position_transmitter.partial.pt").is_file()
    calls.clear()
    again, found_again = et_search.entity_tracking_circuit(model3, data, **kw)
    assert len(calls) == 2  # the second group's last two batches; the first group was kept
    assert again == circuit
    for name, scan in found.items():
        assert torch.equal(found_again[name].ranking().scores.nan_to_num(),
                           scan.ranking().scores.nan_to_num()), name
    assert not list(tmp_path.glob("*.partial.pt"))


def test_search_steps_must_come_after_their_receivers(model3, data):
    bad = (et_search.SearchStep("a", "pos_last", "b", "q"),
           et_search.SearchStep("b", "pos_last"))
    with pytest.raises(ValueError, match="receives from 'b'"):
        et_search.entity_tracking_circuit(model3, data, search=bad)


def test_patching_refuses_misaligned_or_unlabelled_data(model3, data):
    with pytest.raises(ValueError, match="no position column 'pos_nowhere'"):
        path_patching.path_patching_scan(model3, data, position="pos_nowhere")
    bad = data.map(lambda row: {"corrupt_input_ids": row["corrupt_input_ids"][:-1]})
    with pytest.raises(ValueError, match="aligned token for token"):
        activation_patching.activation_patching_scan(model3, bad)
    # 'z' is outside receiver_input's Literal type, which the suite's checker would report first.
    with unchecked(), pytest.raises(ValueError, match="receiver_input='z'"):
        path_patching.path_patching_scan(model3, data, receivers=[Head(1, 0)], receiver_input="z")


@pytest.mark.slow
def test_bench_discovery_script_checks_agreement_and_writes_its_ratios(tmp_path):
    """The benchmark runs end to end on a zoo model and records, per scan, times whose ratio is
    the speed-up and a batched-vs-reference difference within the twins' tolerance."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(repo / "experiments" / "bench_discovery.py"), "--items", "16",
           "--reference-items", "4", "--repeats", "2", "--threads", "1"]
    subprocess.run(cmd, cwd=tmp_path, check=True, capture_output=True, text=True)
    results = tmp_path / "results" / "bench_discovery-et-teacher-cpu.json"
    saved = json.loads(results.read_text())
    for name in ("ablation_scan", "path_patching_logits", "path_patching_values"):
        r = saved["results"][name]
        assert r["speedup"] == pytest.approx(r["reference_s"] / r["batched_s"])
        assert r["max_abs_diff"] < 1e-5
    assert saved["results"]["full_ablation_scan"]["items"] == 16

    # the same model as a checkpoint directory: no twins, TransformerLens beside cdist, the search
    # exact and pre-filtered with the pre-filter's recall
    from cdist import zoo

    ckpt = zoo.export_hf("et-teacher", tmp_path / "et-teacher-ckpt")
    template = zoo.manifest("et-teacher")["config"]["template"]
    cmd = [sys.executable, str(repo / "experiments" / "bench_discovery.py"), "--model", str(ckpt),
           "--template", template, "--no-reference", "--items", "8", "--tl-items", "8",
           "--search-items", "16", "--prefilter", "16", "--recall-top", "3", "--repeats", "1",
           "--threads", "1"]
    subprocess.run(cmd, cwd=tmp_path, check=True, capture_output=True, text=True)
    saved = json.loads((tmp_path / "results" / "bench_discovery-et-teacher-ckpt-cpu.json")
                       .read_text())["results"]
    assert not {"ablation_scan", "path_patching_logits"} & set(saved)
    tl = saved["transformer_lens_activation_patching"]
    assert tl["max_abs_diff"] < 1e-5 and tl["same_top5"] and tl["items"] == 8
    search = saved["entity_tracking_search"]
    assert search["speedup"] == pytest.approx(search["exact_s"] / search["prefiltered_s"])
    # a pre-filter that keeps all 16 heads misses none, and its search is the exact one
    fetchers = search["recall"]["value_fetcher"]
    assert fetchers["chosen"] == search["exact_groups"]["value_fetcher"]
    assert fetchers["chosen_recall"] in (None, 1.0)  # None: the group is empty
    assert fetchers["top3_recall"] == 1.0 and len(fetchers["top3"]) > 0
    assert search["same_circuit"] and search["prefiltered_groups"] == search["exact_groups"]
    assert -1 <= fetchers["spearman"] <= 1

