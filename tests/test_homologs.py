"""Homologs of a student cut from its teacher: the layer origin a cut records and a checkpoint
keeps, the homolog map, recovery, and the CKA matchers finding homologs where they are the same
heads (a cut of an untrained model)."""

import pytest
import torch

from cdist import homologs, matching
from cdist.activations import head_z_dataset
from cdist.models import keep_layers, load_llama, new_llama, save_llama
from cdist.tasks import entity_tracking
from cdist.types import Head

SHAPE = dict(n_layers=4, d_model=32, n_heads=4, n_kv_heads=2, d_mlp=64)


@pytest.fixture(scope="module")
def teacher(tok):
    return new_llama(**SHAPE, vocab_size=len(tok), seed=5, tokenizer=tok).eval()


def test_a_cut_records_its_layer_origin_and_a_checkpoint_keeps_it(teacher, tmp_path):
    assert getattr(teacher, "layer_origin", None) is None
    cut = keep_layers(teacher, [0, 1, 3])
    assert cut.layer_origin == (0, 1, 3)
    assert keep_layers(cut, [0, 2]).layer_origin == (0, 3)  # composed through both cuts
    loaded = load_llama(save_llama(cut, tmp_path / "cut"))
    assert loaded.layer_origin == (0, 1, 3)
    assert load_llama(save_llama(teacher, tmp_path / "whole")).layer_origin is None
    config = (tmp_path / "cut" / "config.json").read_text()
    (tmp_path / "cut" / "config.json").write_text(
        config.replace('"cdist_layer_origin": [\n    0,\n    1,\n    3\n  ]',
                       '"cdist_layer_origin": [0, 1]'))
    with pytest.raises(ValueError, match="cdist_layer_origin = \\[0, 1\\] is not one layer"):
        load_llama(tmp_path / "cut")


def test_homolog_map_and_recovery():
    origin = (0, 1, 3)
    students = [Head(0, 2), Head(2, 1), Head(1, 0)]
    positions = {Head(0, 2): "pos_last", Head(3, 1): "pos_query_label", Head(1, 0): "pos_last"}
    hmap = homologs.homolog_map(students, origin, positions)
    assert [(p.student, p.teacher, p.teacher_position) for p in hmap.pairs] == [
        (Head(0, 2), Head(0, 2), "pos_last"), (Head(2, 1), Head(3, 1), "pos_query_label"),
        (Head(1, 0), Head(1, 0), "pos_last")]
    assert homologs.recovery(hmap, origin) == {"pairs": 3, "homolog_pairs": 3, "recovery": 1.0,
                                               "reachable": 3, "student_heads": 3}
    # every student head to one teacher head: one homolog pair of three, one reachable
    crowded = matching.ablation_matcher(0.5, {h: 0.4 for h in students}, {Head(3, 1): 0.4})
    assert homologs.recovery(crowded, origin) == {"pairs": 3, "homolog_pairs": 1,
                                                  "recovery": 1 / 3, "reachable": 1,
                                                  "student_heads": 3}
    with pytest.raises(ValueError, match="no position for the homolog teacher heads"):
        homologs.homolog_map(students, origin, {})
    for bad in ((0, 1), (0, 0, 1), (0, 1, 4)):
        with pytest.raises(ValueError, match="is this student cut from this teacher"):
            homologs.check_origin(bad, 3, 4)


@pytest.mark.parametrize("one_to_one", [False, True])
def test_cka_matchers_recover_every_homolog_of_an_untrained_cut(teacher, tok, one_to_one):
    """Cut after its first three layers and not trained, the student's heads are the teacher's
    own: each is most similar (CKA 1) to its homolog, among all the teacher's heads."""
    student = keep_layers(teacher, [0, 1, 2])
    data = entity_tracking(48, tokenizer=tok, n_boxes=3, seed=2)
    s_heads = [Head(layer, h) for layer in range(3) for h in range(4)]
    t_heads = [Head(layer, h) for layer in range(4) for h in range(4)]
    hmap = matching.cka_matcher(head_z_dataset(student, data, s_heads),
                                head_z_dataset(teacher, data, t_heads), one_to_one=one_to_one)
    assert homologs.recovery(hmap, student.layer_origin)["recovery"] == 1.0
    best = hmap.matrix.max(1).values
    assert torch.allclose(best, torch.ones_like(best), atol=1e-4)
