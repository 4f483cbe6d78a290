"""Head activations, the three matchers, one-to-one assignment against brute force, and the head map figure."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cdist import activations, matching, plots, tasks
from cdist.types import Head

S = [Head(0, 1), Head(1, 0), Head(1, 3)]
T = [Head(0, 0), Head(2, 5)]


def per_head(heads, values):
    return dict(zip(heads, values, strict=True))


def test_head_z_reads_each_rows_own_position(model, tok):
    data = tasks.theory_of_mind(6, tokenizer=tok, template="compact", seed=3)  # prompts of several lengths
    heads = [Head(0, 1), Head(1, 2)]
    got = activations.head_z_dataset(model, data, heads, batch_size=4)
    for i, item in enumerate(data):
        _, cache = model.run_with_cache(torch.tensor([item["input_ids"]]))
        for h in heads:
            want = cache[h.hook_z][0, item["pos_last"], h.head]
            assert torch.allclose(got[h][i], want, atol=1e-5)
    other = activations.head_z_dataset(model, data, heads, position="pos_query_character")
    assert not torch.allclose(other[heads[0]], got[heads[0]])


def test_head_z_keeps_gradients(model, tok):
    data = tasks.entity_tracking(4, tokenizer=tok, n_boxes=3, template="compact", seed=0)
    ids, pos = torch.tensor(data["input_ids"]), torch.tensor(data["pos_last"])
    _, z = activations.head_z(model, ids, [Head(1, 1)], pos)
    z[Head(1, 1)].sum().backward()
    assert model.blocks[1].attn.W_Q.grad[1].abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_ablation_matcher_uses_the_students_baseline():
    # dP_s = 0.5 - P_s_abl: 0.1, 0.3, 0.0; dP_t = 0.5 - P_t_abl: 0.32, 0.05
    hm = matching.ablation_matcher(0.5, per_head(S, [0.4, 0.2, 0.5]), per_head(T, [0.18, 0.45]))
    assert torch.allclose(hm.matrix, torch.tensor([[0.22, 0.05], [0.02, 0.25], [0.32, 0.05]]), atol=1e-6)
    assert hm.pairs == ((S[0], T[1]), (S[1], T[0]), (S[2], T[1]))  # many-to-one allowed
    assert hm.kind == "distance" and hm.method == "ablation"
    one = matching.ablation_matcher(0.5, per_head(S, [0.4, 0.2, 0.5]), per_head(T, [0.18, 0.45]), one_to_one=True)
    assert len(one.pairs) == 2 and len({t for _, t in one.pairs}) == 2


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
                                   per_head(teachers, torch.rand(n_t, generator=g).tolist()), one_to_one=True)
    cost = sum(float(hm.matrix[students.index(s), teachers.index(t)]) for s, t in hm.pairs)
    k = min(n_s, n_t)
    best = min(sum(float(hm.matrix[r, c]) for r, c in zip(rows, cols, strict=True))
               for rows in itertools.permutations(range(n_s), k) for cols in itertools.combinations(range(n_t), k))
    assert len(hm.pairs) == k and cost == pytest.approx(best, abs=1e-6)


def test_cka_matcher_recovers_rotated_copies():
    g = torch.Generator().manual_seed(0)
    acts = [torch.randn(64, 8, generator=g) for _ in range(3)]
    rot = [torch.linalg.qr(torch.randn(8, 8, generator=g))[0] for _ in range(3)]
    student = {S[i]: acts[i] for i in range(3)}
    perm = [2, 0, 1]
    teacher = {Head(3, j): 2.0 * acts[perm[j]] @ rot[j] for j in range(3)}  # teacher head j copies student perm[j]
    hm = matching.cka_matcher(student, teacher)
    assert {(s, t) for s, t in hm.pairs} == {(S[perm[j]], Head(3, j)) for j in range(3)}
    assert hm.kind == "similarity" and torch.all(hm.matrix.diagonal() <= 1.0 + 1e-5)
    assert matching.cka_matcher(student, teacher, one_to_one=True).pairs == tuple(sorted(hm.pairs))


def test_random_matcher_is_seeded():
    a = matching.random_matcher(S, T, seed=3)
    assert a.pairs == matching.random_matcher(S, T, seed=3).pairs
    assert any(matching.random_matcher(S, T, seed=s).pairs != a.pairs for s in range(4, 12))
    assert [s for s, _ in a.pairs] == S


def test_head_map_json_round_trip_and_figure(tmp_path):
    hm = matching.ablation_matcher(0.5, per_head(S, [0.4, 0.2, 0.5]), per_head(T, [0.18, 0.45]),
                                   student_model="s", teacher_model="t")
    hm.to_json(tmp_path / "map.json")
    back = matching.HeadMap.from_json(tmp_path / "map.json")
    assert back.pairs == hm.pairs and torch.allclose(back.matrix, hm.matrix) and back.method == hm.method
    fig = plots.head_map_figure(hm)
    assert len(fig.layout.shapes) == len(hm.pairs)
    assert plots.save_figure(fig, tmp_path / "map")[0].exists()


def test_empty_circuits_are_refused():
    with pytest.raises(ValueError, match="is a circuit empty"):
        matching.ablation_matcher(0.5, {}, {T[0]: 0.1})
