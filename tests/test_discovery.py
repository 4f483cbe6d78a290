"""The per-task circuit selection rules of cdist.discovery."""

from __future__ import annotations

import math

import pytest
from conftest import unchecked

from cdist import discovery, tasks
from cdist.discovery import ablation, circuits, search


@pytest.fixture(scope="module")
def tom_teacher():
    from cdist import zoo

    if "tom-teacher" not in zoo.names():
        pytest.skip("needs the shipped zoo")
    return zoo.load("tom-teacher")[0]


def tom_items(tok, n, seed):
    return tasks.theory_of_mind(n, tokenizer=tok, template="compact", seed=seed, split="test")


def test_mean_ablation_rule_grows_until_the_target_within_the_budget(tom_teacher, tok):
    items, means = tom_items(tok, 40, 5), ablation.head_means(tom_teacher, tom_items(tok, 60, 6))
    n_heads = tom_teacher.cfg.n_layers * tom_teacher.cfg.n_heads
    easy = discovery.DiscoveryConfig(method="mean_ablation", budget=0.5, target=0.0)
    found = discovery.find_circuit(tom_teacher, "theory_of_mind", items, means, easy)
    circuit, record = found.circuit, found.record
    assert len(circuit.heads) == 1 and record["discovery_faithfulness"] >= 0.0
    assert set(found.scans) == {"mean_ablation"} and circuit.method == "mean_ablation"
    assert circuit.heads == found.scans["mean_ablation"].ranking().top(1)
    unreachable = discovery.DiscoveryConfig(method="mean_ablation", budget=0.25, target=math.inf)
    found = discovery.find_circuit(tom_teacher, "theory_of_mind", items, means, unreachable)
    circuit, record = found.circuit, found.record
    assert len(circuit.heads) == math.floor(0.25 * n_heads)
    assert record["discovery_faithfulness"] < math.inf


def test_mean_ablation_growth_bisects_to_the_plain_loops_circuit(tom_teacher, tok):
    """Doubling then bisection on the ranked list finds the circuit one evaluation per added head
    finds (the plain twin, here), in a handful of evaluations."""
    from cdist.discovery import faithfulness
    from cdist.evaluate import accuracy

    items, means = tom_items(tok, 40, 5), ablation.head_means(tom_teacher, tom_items(tok, 60, 6))
    n_heads = tom_teacher.cfg.n_layers * tom_teacher.cfg.n_heads
    found = None
    for target in (0.8, 0.95):
        rule = discovery.DiscoveryConfig(method="mean_ablation", budget=0.5, target=target)
        found = discovery.find_circuit(tom_teacher, "theory_of_mind", items, means, rule)
        ranked = found.scans["mean_ablation"].ranking().top(math.floor(0.5 * n_heads))
        full = accuracy(tom_teacher, items)
        plain, _ = faithfulness.grow_one_at_a_time(
            tom_teacher, [], ranked, items, means, full_accuracy=full, threshold=target,
            max_heads=len(ranked))
        assert set(found.circuit.heads) == set(ranked[:plain]), target
        assert found.record["evaluations"] <= 2 * math.ceil(math.log2(len(ranked))) + 1
        assert found.record["discovery_faithfulness"] >= target
    assert plain > 1  # the second target needed growth, not the first head alone


def test_a_model_that_gets_nothing_right_grows_to_the_budget(model, tok):
    """Faithfulness is undefined (NaN) when the full model scores 0, so the target is never met."""
    items = tom_items(tok, 16, 5)
    rule = discovery.DiscoveryConfig(method="mean_ablation", budget=0.5, target=0.0)
    means = ablation.head_means(model, items)
    found = discovery.find_circuit(model, "theory_of_mind", items, means, rule)
    circuit, record = found.circuit, found.record
    assert math.isnan(record["discovery_faithfulness"])
    assert len(circuit.heads) <= math.floor(0.5 * model.cfg.n_layers * model.cfg.n_heads)


def test_auto_picks_path_patching_for_entity_tracking_and_its_search_by_template(model, tok):
    items = tasks.entity_tracking(6, tokenizer=tok, n_boxes=3, template="adjacent", seed=2)
    means = ablation.head_means(model, items)
    rule = discovery.DiscoveryConfig(min_effect=0.0)
    found = discovery.find_circuit(model, "entity_tracking", items, means, rule)
    record = found.record
    assert record["method"] == "path_patching" and record["search"] == "adjacent"
    assert "object_binder" in found.circuit.groups and "path_patching_value_fetcher" in found.scans
    prakash = tasks.entity_tracking(6, tokenizer=tok, n_boxes=3, template="prakash", seed=2)
    prakash_means = ablation.head_means(model, prakash)
    record = discovery.find_circuit(model, "entity_tracking", prakash, prakash_means, rule).record
    assert record["search"] == "prakash"
    # 'magic' is outside method's Literal type, which the suite's checker would report first.
    with unchecked(), pytest.raises(ValueError, match="discovery method"):
        discovery.DiscoveryConfig(method="magic")


def test_every_method_and_search_name_has_its_function():
    """The config's Literal types name exactly the registered methods and searches, and a name
    outside them is refused with the choices."""
    assert circuits.METHODS == ("auto", *circuits.DISCOVERERS)
    assert circuits.SEARCHES == ("auto", *search.SEARCHES, "positions")
    assert circuits.METRIC_NAMES == ("auto", "prob", "logit_diff", "logit_diff_normalised")
    with unchecked():
        with pytest.raises(ValueError, match=r"metric 'kl'.*'logit_diff'"):
            discovery.DiscoveryConfig(metric="kl")
        with pytest.raises(ValueError, match=r"'magic'.*'path_patching', 'mean_ablation'"):
            discovery.DiscoveryConfig(method="magic")
        with pytest.raises(ValueError, match=r"search 'deep'.*'prakash', 'adjacent'"):
            discovery.DiscoveryConfig(search="deep")
