"""IOI (``cdist.tasks.ioi``) and the general path-patching search (``cdist.discovery.search``):
items read back by an independent parser, splits, the default search built from a task's
positions, and the entity-tracking search as one configuration of the general one, held to a
circuit recorded before it was one."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from cdist import tasks
from cdist.discovery import metrics, search
from cdist.discovery.search import SearchStep
from cdist.errors import InputError
from cdist.tasks.ioi import NAMES
from cdist.types import Circuit, Head

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def llama_tok():
    from cdist.tokenizers import llama3_tokenizer

    return llama3_tokenizer()


def names_in(text: str) -> list[str]:
    """The capitalised words of a sentence that are names (every IOI name is in ``NAMES``)."""
    return [w for w in re.findall(r"[A-Z][a-z]+", text) if w in NAMES]


@pytest.mark.parametrize("template", sorted(tasks.IOI_TEMPLATES))
def test_the_answer_is_the_name_said_once_and_the_rival_the_one_said_twice(llama_tok, template):
    data = tasks.ioi(24, tokenizer=llama_tok, template=template, seed=3)
    orders = set()
    for item in data:
        said = names_in(item["prompt"])
        assert len(said) == 3 and len(set(said)) == 2
        once = [n for n in said if said.count(n) == 1]
        twice = [n for n in said if said.count(n) == 2]
        assert llama_tok.decode([item["answer_id"]]).strip() == once[0] == item["answer"]
        assert llama_tok.decode([item[metrics.CONTRAST]]).strip() == twice[0]
        orders.add("ABBA" if said[0] == once[0] else "BABA")
        assert item["order"] == ("ABBA" if said[0] == once[0] else "BABA")
        # the ABC counterfactual: three names, all other than the clean ones, same tokens around
        other = names_in(item["corrupt_prompt"])
        assert len(set(other)) == 3 and not set(other) & set(said)
        assert len(item["corrupt_input_ids"]) == len(item["input_ids"])
        ids = item["input_ids"]
        for column, name in (("pos_io", once[0]), ("pos_s1", twice[0]), ("pos_s2", twice[0])):
            assert llama_tok.decode([ids[item[column]]]).strip() == name
        assert item["pos_s1"] < item["pos_s2"] and item["pos_s1_next"] == item["pos_s1"] + 1
        assert item["pos_last"] == len(ids) - 1
        assert llama_tok.decode(ids[item["pos_last"]:]).strip() in ("to", "it to")
    assert orders == {"ABBA", "BABA"}


def test_ioi_splits_are_disjoint_and_items_stable(llama_tok):
    train = tasks.ioi(60, tokenizer=llama_tok, template="mixed", seed=0)
    test = tasks.ioi(40, tokenizer=llama_tok, template="mixed", seed=0, split="test")
    assert not set(train["prompt"]) & set(test["prompt"])
    assert tasks.ioi(10, tokenizer=llama_tok, template="mixed", seed=0)["prompt"] == \
        train["prompt"][:10]
    assert len(set(train["template"])) > 1
    with pytest.raises(InputError, match="ioi template 'bar'"):
        tasks.ioi(2, tokenizer=llama_tok, template="bar")
    with pytest.raises(InputError, match="name list has 4 words but an item needs 5"):
        tasks.ioi(2, tokenizer=llama_tok, names=["Mary", "John", "Alice", "Bob"])
    task = tasks.get_task("ioi")
    assert task.metric == "logit_diff" and task.search(train) == "ioi"
    assert task.chance_accuracy(train) == 0.5


def test_the_default_search_walks_back_from_the_logits_through_every_named_position(llama_tok):
    data = tasks.ioi(4, tokenizer=llama_tok)
    steps = search.search_steps("positions", data)
    assert steps[:2] == (SearchStep("direct", "pos_last"),
                         SearchStep("q_last", "pos_last", "direct", "q"))
    expected = {(f"{kv}_{p}", f"pos_{p}", kv) for p in ("last", "io", "s1", "s2", "s1_next")
                for kv in "kv"}
    assert {(st.name, st.position, st.receiver_input) for st in steps[2:]} == expected
    assert all(st.receivers == "direct" for st in steps[1:])
    assert search.search_steps("ioi", data) == search.IOI_SEARCH
    with pytest.raises(InputError, match=r"reads positions \['pos_prev_label', 'pos_query_label'"):
        search.search_steps("prakash", data)
    with pytest.raises(InputError, match="search 'deep'"):
        search.search_steps("deep", data)


def test_the_general_search_on_prakash_steps_is_the_recorded_entity_tracking_search():
    """et-teacher's circuit as the zoo survey recorded it (results/discovery, before the search
    was generalised): the same 200 items, rule and groups give the same heads and scores."""
    from cdist import zoo
    from cdist.zoo import organisms

    model, tok = zoo.load("et-teacher")
    org = organisms.OrganismConfig.from_dict(zoo.manifest("et-teacher")["config"])
    items = organisms.held_out(org, tok, 200, seed=102)  # the survey's discovery items, seed 0
    name = tasks.get_task("entity_tracking").search(items)
    circuit, _ = search.path_patching_circuit(model, items, search=search.search_steps(name, items),
                                              k=2, min_effect=0.01, min_share=0.0,
                                              model_name="et-teacher")
    recorded = ROOT / "results" / "discovery" / "circuits" / "et-teacher-path_patching.json"
    expected = Circuit.from_dict(json.loads(recorded.read_text()))
    # the same heads and groups; the scores to float32 rounding, since the record was made on
    # another machine, whose kernels summed in another order (cdist.numerics)
    assert dataclasses.replace(circuit, scores=expected.scores) == expected
    assert circuit.scores == pytest.approx(expected.scores, rel=1e-5, abs=1e-7)
    assert circuit.groups["object_binder"] == (Head(0, 3),)


def test_a_search_on_ioi_items_by_logit_difference_builds_wang_et_al_s_groups(llama_tok):
    """On a tiny random model with Llama-3's tokenizer: the groups, their positions and receivers,
    each scan by logit difference (the task's metric)."""
    from cdist.models import new_llama

    model = new_llama(n_layers=3, d_model=32, n_heads=4, n_kv_heads=2, d_mlp=64,
                      vocab_size=len(llama_tok), seed=1, tokenizer=llama_tok).eval()
    data = tasks.ioi(6, tokenizer=llama_tok, seed=1)
    circuit, scans = search.path_patching_circuit(model, data, search=search.IOI_SEARCH, k=1,
                                                  min_effect=0.0, min_share=0.0,
                                                  metric="logit_diff")
    assert list(circuit.groups) == [st.name for st in search.IOI_SEARCH]
    assert circuit.positions["induction_duplicate"] == "pos_s2"
    assert circuit.positions["previous_token"] == "pos_s1_next"
    for step in search.IOI_SEARCH:
        if step.name in scans:
            assert scans[step.name].metric == "logit_diff_change"
            assert set(scans[step.name].receivers) == set(circuit.groups.get(step.receivers, ()))
    assert circuit.groups["name_mover"]
