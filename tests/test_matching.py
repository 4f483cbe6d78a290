"""Head activations, the three matchers, one-to-one assignment against brute force, and the head
map figure."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cdist import activations, matching, plots, tasks
from cdist.discovery import ablation
from cdist.models import hook_z
from cdist.records import read_record, write_record
from cdist.types import Circuit, Head, HeadPair

S = [Head(0, 1), Head(1, 0), Head(1, 3)]
T = [Head(0, 0), Head(2, 5)]


def per_head(heads, values):
    return dict(zip(heads, values, strict=True))


def test_head_z_reads_each_rows_own_position(model, tok):
    # prompts of several lengths
    data = tasks.theory_of_mind(6, tokenizer=tok, template="compact", seed=3)
    heads = [Head(0, 1), Head(1, 2)]
    got = activations.head_z_dataset(model, data, heads, batch_size=4)
    for i, item in enumerate(data):
        _, cache = model.run_with_cache(torch.tensor([item["input_ids"]]))
        for h in heads:
            want = cache[hook_z(h.layer)][0, item["pos_last"], h.head]
            assert torch.allclose(got[h][i], want, atol=1e-5)
    other = activations.head_z_dataset(model, data, heads, position="pos_query_character")
    assert not torch.allclose(other[heads[0]], got[heads[0]])


def test_sites_read_each_head_at_its_own_column(model, tok):
    """One pass reads several (head, column) sites; each row checked against a plain per-item
    cache."""
    data = tasks.entity_tracking(5, tokenizer=tok, n_boxes=3, template="compact", seed=2)
    sites = [(Head(0, 1), "pos_prev_label"), (Head(0, 1), "pos_last"),
             (Head(1, 2), "pos_query_label")]
    got = activations.head_z_dataset(model, data, sites, batch_size=2)
    for i, item in enumerate(data):
        _, cache = model.run_with_cache(torch.tensor([item["input_ids"]]))
        for h, col in sites:
            want = cache[hook_z(h.layer)][0, item[col], h.head]
            assert torch.allclose(got[(h, col)][i], want, atol=1e-5)
    assert not torch.allclose(got[sites[0]], got[sites[1]])
    ids, last = torch.tensor(data["input_ids"]), torch.tensor(data["pos_last"])
    with pytest.raises(ValueError, match="no positions given"):
        activations.head_z(model, ids, sites, {"pos_last": last})


def test_head_z_keeps_gradients(model, tok):
    data = tasks.entity_tracking(4, tokenizer=tok, n_boxes=3, template="compact", seed=0)
    ids, pos = torch.tensor(data["input_ids"]), torch.tensor(data["pos_last"])
    _, z = activations.head_z(model, ids, [(Head(1, 1), "pos_last")], {"pos_last": pos})
    z[(Head(1, 1), "pos_last")].sum().backward()
    assert model.blocks[1].attn.W_Q.grad[1].abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_head_z_logits_are_the_models_at_pos_last(model, tok):
    data = tasks.entity_tracking(5, tokenizer=tok, n_boxes=3, template="compact", seed=1)
    ids, pos = torch.tensor(data["input_ids"]), torch.tensor(data["pos_last"]) - 1
    site = (Head(1, 1), "pos_last")
    # replaced weights (as masked-head training passes them) reach the logits and the z
    params = {"blocks.1.attn.W_Q": model.blocks[1].attn.W_Q * 1.5,
              "ln_final.w": model.ln_final.w * 0.5}
    plain = []
    for replaced in ({}, params):
        logits, z = activations.head_z(model, ids, [site], {"pos_last": pos}, params=replaced)
        plain = plain or [z[site]]
        with torch.no_grad():
            backup = {k: model.get_parameter(k).clone() for k in replaced}
            for k, v in replaced.items():
                model.get_parameter(k).copy_(v)
            want_logits, cache = model.run_with_cache(ids)
            for k, v in backup.items():
                model.get_parameter(k).copy_(v)
        rows = torch.arange(len(ids))
        assert logits.shape == (len(ids), model.cfg.d_vocab)
        torch.testing.assert_close(logits, want_logits[rows, pos], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(z[site], cache[hook_z(1)][rows, pos, 1], atol=1e-6, rtol=1e-5)
    none, z_only = activations.head_z(model, ids, [site], {"pos_last": pos}, logits=False)
    assert none is None
    torch.testing.assert_close(z_only[site], plain[0])
    assert not torch.allclose(plain[0], z[site])  # the replaced W_Q did reach z


def test_ablation_matcher_uses_the_students_baseline():
    # dP_s = 0.5 - P_s_abl: 0.1, 0.3, 0.0; dP_t = 0.5 - P_t_abl: 0.32, 0.05
    hm = matching.ablation_matcher(0.5, per_head(S, [0.4, 0.2, 0.5]), per_head(T, [0.18, 0.45]))
    want = torch.tensor([[0.22, 0.05], [0.02, 0.25], [0.32, 0.05]])
    assert torch.allclose(hm.matrix, want, atol=1e-6)
    # many-to-one allowed
    assert hm.pairs == (HeadPair(S[0], T[1]), HeadPair(S[1], T[0]), HeadPair(S[2], T[1]))
    assert hm.kind == "distance" and hm.method == "ablation"
    one = matching.ablation_matcher(0.5, per_head(S, [0.4, 0.2, 0.5]), per_head(T, [0.18, 0.45]),
                                    one_to_one=True)
    assert len(one.pairs) == 2 and len({p.teacher for p in one.pairs}) == 2


def test_normalised_matcher_reads_each_model_against_its_own_baseline():
    # relative drops: student (0.5 - [0.4, 0.2, 0.5]) / 0.5 = 0.2, 0.6, 0.0;
    # teacher (1.0 - [0.1, 0.9]) / 1.0 = 0.9, 0.1
    hm = matching.ablation_matcher(0.5, per_head(S, [0.4, 0.2, 0.5]), per_head(T, [0.1, 0.9]),
                                   teacher_base=1.0, normalise="baseline")
    assert torch.allclose(hm.matrix, torch.tensor([[0.7, 0.1], [0.3, 0.5], [0.9, 0.1]]), atol=1e-6)
    assert [p.teacher for p in hm.pairs] == [T[1], T[0], T[1]] and hm.method == "ablation-baseline"
    # the paper's rule on the same numbers: the teacher's drops against the student's baseline
    # (0.4, -0.4)
    paper = matching.ablation_matcher(0.5, per_head(S, [0.4, 0.2, 0.5]), per_head(T, [0.1, 0.9]))
    assert [p.teacher for p in paper.pairs] == [T[0], T[0], T[0], T[1]]  # S[2] ties at 0.4
    with pytest.raises(ValueError, match="teacher_base"):
        matching.ablation_matcher(0.5, per_head(S, [0.4, 0.2, 0.5]), per_head(T, [0.1, 0.9]),
                                  normalise="baseline")


def test_ties_keep_every_minimiser():
    tie = matching.ablation_matcher(0.5, {S[0]: 0.3}, per_head(T, [0.1, 0.5]))
    assert tie.matrix[0, 0] == pytest.approx(0.2) and tie.matrix[0, 1] == pytest.approx(0.2)
    assert tie.teachers_of(S[0]) == (T[0], T[1])


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5), st.integers(1, 5), st.integers(0, 10_000))
def test_one_to_one_is_the_cheapest_assignment(n_s, n_t, seed):
    g = torch.Generator().manual_seed(seed)
    students = [Head(0, i) for i in range(n_s)]
    teachers = [Head(1, i) for i in range(n_t)]
    hm = matching.ablation_matcher(1.0, per_head(students, torch.rand(n_s, generator=g).tolist()),
                                   per_head(teachers, torch.rand(n_t, generator=g).tolist()),
                                   one_to_one=True)
    cost = sum(float(hm.matrix[students.index(p.student), teachers.index(p.teacher)])
               for p in hm.pairs)
    k = min(n_s, n_t)
    best = min(sum(float(hm.matrix[r, c]) for r, c in zip(rows, cols, strict=True))
               for rows in itertools.permutations(range(n_s), k)
               for cols in itertools.combinations(range(n_t), k))
    assert len(hm.pairs) == k and cost == pytest.approx(best, abs=1e-6)


def test_cka_matcher_recovers_rotated_copies():
    g = torch.Generator().manual_seed(0)
    acts = [torch.randn(64, 8, generator=g) for _ in range(3)]
    rot = [torch.linalg.qr(torch.randn(8, 8, generator=g))[0] for _ in range(3)]
    student = {S[i]: acts[i] for i in range(3)}
    perm = [2, 0, 1]
    # teacher head j copies student perm[j]
    teacher = {Head(3, j): 2.0 * acts[perm[j]] @ rot[j] for j in range(3)}
    hm = matching.cka_matcher(student, teacher)
    assert ({(p.student, p.teacher) for p in hm.pairs}
            == {(S[perm[j]], Head(3, j)) for j in range(3)})
    assert hm.kind == "similarity" and torch.all(hm.matrix.diagonal() <= 1.0 + 1e-5)
    assert matching.cka_matcher(student, teacher, one_to_one=True).pairs == tuple(sorted(hm.pairs))


def test_cka_matcher_compares_at_each_teacher_heads_position():
    g = torch.Generator().manual_seed(1)
    at = {col: torch.randn(48, 6, generator=g) for col in ("pos_a", "pos_b")}
    student = {(s, col): at[col] + 0.1 * torch.randn(48, 6, generator=g) for s in S for col in at}
    student[(S[1], "pos_b")] = torch.randn(48, 6, generator=g)  # S[1] is unlike anything at pos_b
    teacher = {(T[0], "pos_a"): at["pos_a"] @ torch.linalg.qr(torch.randn(6, 6, generator=g))[0],
               (T[1], "pos_b"): 3.0 * at["pos_b"]}
    hm = matching.cka_matcher(student, teacher)
    assert hm.teachers_of(S[1]) == (T[0],)
    column = {T[0]: "pos_a", T[1]: "pos_b"}
    assert all(p.student_position == p.teacher_position == column[p.teacher] for p in hm.pairs)
    with pytest.raises(ValueError, match="lacks the site"):
        matching.cka_matcher({(S[0], "pos_a"): at["pos_a"]}, teacher)


def test_random_matcher_draws_distinct_heads_and_is_seeded():
    teachers = [Head(1, i) for i in range(6)]
    a = matching.random_matcher(S, teachers, seed=3)
    assert a.pairs == matching.random_matcher(S, teachers, seed=3).pairs
    assert any(matching.random_matcher(S, teachers, seed=s).pairs != a.pairs for s in range(4, 12))
    assert [p.student for p in a.pairs] == S and len({p.teacher for p in a.pairs}) == len(S)
    with pytest.raises(ValueError, match="distinct random teacher heads"):
        matching.random_matcher(S, T, seed=0)


def test_random_control_has_the_aligned_maps_shape_outside_the_teacher_circuit():
    teachers = [Head(layer, h) for layer in range(2) for h in range(8)]
    circuit = [T[0], Head(1, 3), Head(1, 5), Head(0, 7)]
    aligned = matching.ablation_matcher(0.5, per_head(S, [0.4, 0.2, 0.5]),
                                        per_head(T[:1] + [Head(1, 3)], [0.1, 0.4]))
    aligned = aligned.placed({T[0]: "pos_prev_label", Head(1, 3): "pos_last"})
    assert len({p.teacher for p in aligned.pairs}) < len(aligned.pairs)  # many to one

    def shape(hm):  # which pairs share a teacher head
        return sorted(sorted(i for i, p in enumerate(hm.pairs) if p.teacher == t)
                      for t in {p.teacher for p in hm.pairs})

    for seed in range(20):
        rand = matching.random_control(aligned, teachers, seed=seed, exclude=circuit)
        assert not {p.teacher for p in rand.pairs} & set(circuit)
        assert shape(rand) == shape(aligned)
        for r, a in zip(rand.pairs, aligned.pairs, strict=True):
            assert ((r.student, r.student_position, r.teacher_position)
                    == (a.student, a.student_position, a.teacher_position))
    first = matching.random_control(aligned, teachers, seed=1).pairs
    assert first == matching.random_control(aligned, teachers, seed=1).pairs
    assert any(matching.random_control(aligned, teachers, seed=s).pairs != first
               for s in range(2, 10))
    one_to_one = matching.ablation_matcher(0.5, per_head(S[:2], [0.4, 0.2]),
                                           per_head(T, [0.1, 0.4]), one_to_one=True)
    rand = matching.random_control(one_to_one, teachers, seed=0, exclude=circuit)
    assert len({p.teacher for p in rand.pairs}) == len(rand.pairs) == 2
    with pytest.raises(ValueError, match="random control needs"):
        matching.random_control(aligned, teachers[:2], seed=0, exclude=circuit)


def test_placed_at_and_crowded():
    hm = matching.ablation_matcher(0.5, per_head(S, [0.4, 0.2, 0.5]), per_head(T, [0.18, 0.45]))
    placed = hm.placed({T[0]: "pos_prev_label", T[1]: "pos_last"}, {S[2]: "pos_query_label"})
    assert [(p.student_position, p.teacher_position) for p in placed.pairs] == [
        ("pos_last", "pos_last"), ("pos_prev_label", "pos_prev_label"),
        ("pos_query_label", "pos_last")]
    assert {p.teacher_position for p in placed.at("pos_x").pairs} == {"pos_x"}
    assert placed.crowded() == {T[1]: 2}  # 2 of 3 student heads
    two = matching.ablation_matcher(0.5, per_head(S[:2], [0.4, 0.2]), per_head(T, [0.18, 0.45]))
    assert two.crowded() == {}
    with pytest.raises(ValueError, match="no position for teacher heads"):
        hm.placed({T[0]: "pos_last"})


def test_circuit_positions_take_each_heads_first_group():
    circuit = Circuit({"value_fetcher": ("a1.h2", "a0.h1"), "object_binder": ("a0.h1", "a0.h3")},
                      positions={"value_fetcher": "pos_last", "object_binder": "pos_prev_label"})
    assert matching.circuit_positions(circuit) == {Head(1, 2): "pos_last", Head(0, 1): "pos_last",
                                                   Head(0, 3): "pos_prev_label"}


def test_work_positions_match_the_one_head_reference_scan(model, tok):
    data = tasks.entity_tracking(12, tokenizer=tok, n_boxes=3, template="compact", seed=5)
    reference = tasks.entity_tracking(24, tokenizer=tok, n_boxes=3, template="compact", seed=6)
    means = ablation.head_means(model, reference)
    heads = [Head(0, 0), Head(0, 3), Head(1, 1)]
    columns = matching.position_columns(data)
    assert {"pos_last", "pos_prev_label", "pos_query_label"} <= set(columns)
    assert "pos_objects" not in columns
    tom = tasks.theory_of_mind(24, tokenizer=tok, template="compact", seed=0)
    assert None in tom["pos_visibility"] and "pos_visibility" not in matching.position_columns(tom)
    tom_columns = set(matching.position_columns(tom))
    assert {"pos_last", "pos_query_character", "pos_query_container"} <= tom_columns
    chosen, drops = matching.work_positions(model, data, heads, means, batch_size=5)
    for col in columns:
        scan = ablation.head_ablation_scan_reference(model, data, means=means, position=col)
        reference = scan["prob_drop"]
        for h in heads:
            assert drops[h][col] == pytest.approx(float(reference[h.layer, h.head]), abs=1e-5)
    for h in heads:
        assert drops[h][chosen[h]] == max(drops[h].values())
    assert any(abs(v) > 1e-4 for d in drops.values() for v in d.values())  # something was measured


def test_head_map_json_round_trip_and_figure(tmp_path):
    hm = matching.ablation_matcher(0.5, per_head(S, [0.4, 0.2, 0.5]), per_head(T, [0.18, 0.45]),
                                   student_model="s", teacher_model="t")
    write_record(hm, tmp_path / "map.json")
    back = read_record(matching.HeadMap, tmp_path / "map.json")
    assert back.pairs == hm.pairs and torch.allclose(back.matrix, hm.matrix)
    assert back.method == hm.method
    placed = hm.placed({T[0]: "pos_prev_label", T[1]: "pos_last"})
    assert read_record(matching.HeadMap, write_record(placed)).pairs == placed.pairs
    # files of the old format
    old = hm.to_dict() | {"pairs": [[str(p.student), str(p.teacher)] for p in hm.pairs]}
    assert matching.HeadMap.from_dict(old).pairs == hm.pairs
    fig = plots.head_map_figure(hm)
    assert len(fig.layout.shapes) == len(hm.pairs)
    labels = [a.text for a in plots.head_map_figure(placed).layout.annotations]
    assert labels == ["last", "prev_label", "last"]
    assert plots.save_figure(fig, tmp_path / "map")[0].exists()


def test_empty_circuits_are_refused():
    with pytest.raises(ValueError, match="is a circuit empty"):
        matching.ablation_matcher(0.5, {}, {T[0]: 0.1})
