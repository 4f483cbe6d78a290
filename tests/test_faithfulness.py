"""A circuit must carry its model's task: the effect floor of head selection, stage 1's
faithfulness check (growth, refusal, chance, reuse from the store) and what ``cdist discover``
says about it."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import unchecked

from cdist import cli, pipeline, tasks
from cdist.discovery import DiscoveryConfig, faithfulness, search
from cdist.discovery.selection import select_heads
from cdist.errors import UnfaithfulCircuitError
from cdist.models import save_llama
from cdist.pipeline import circuits as stage
from cdist.types import Circuit, Head, HeadScores, Scan

# the zoo pair on small item sets: the teacher's circuit is faithful on these validation items,
# the student's (5 heads) keeps 0.792 of its accuracy, under the default threshold of 0.8
SMALL = pipeline.ExperimentConfig(
    task="entity_tracking", task_kwargs={"template": "adjacent", "n_boxes": 7}, regimes=(32,),
    val_items=48, test_items=16, reference_items=80, discovery_items=48, n_random=1,
    discovery=DiscoveryConfig(min_effect=0.0))
ZOO_FLAGS = ["--teacher", "et-teacher", "--student", "et-student", "--val-items", "48",
             "--test-items", "40", "--ood-items", "8", "--reference-items", "80",
             "--discovery-items", "48", "--n-random", "1", "--min-effect", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def pair():
    from cdist import zoo

    return {role: zoo.load(f"et-{role}")[0].eval() for role in ("teacher", "student")}


def context(pair, out, roles=("teacher", "student"), lines=None, **changes):
    return pipeline.Context(replace(SMALL, **changes), out,
                            {role: (lambda m=pair[role]: m) for role in roles},
                            {role: f"et-{role}" for role in roles}, progress=False,
                            log=(lines.append if lines is not None else lambda _: None))


# ------------------------------------------------------------------------------ the effect floor
def test_the_floor_keeps_only_effects_near_the_largest():
    drops = HeadScores(torch.tensor([[0.5, 1e-3], [4e-3, 2e-6]]), "prob_drop")
    assert select_heads(drops, 4) == (Head(0, 0), Head(1, 0), Head(0, 1), Head(1, 1))
    assert select_heads(drops, 4, min_share=0.01) == (Head(0, 0),)
    assert select_heads(drops, 4, min_share=0.001) == (Head(0, 0), Head(1, 0), Head(0, 1))
    # path patching: the important direction is negative; a larger yardstick from elsewhere
    paths = HeadScores(torch.tensor([[-2e-4, -7e-5], [3e-2, float("nan")]]), "relative_change",
                       higher_is_important=False)
    assert select_heads(paths, 4, min_share=0.01) == (Head(0, 0), Head(0, 1))
    assert select_heads(paths, 4, min_share=0.01, reference=0.019) == (Head(0, 0),)
    assert select_heads(paths, 4, min_share=1.0) == (Head(0, 0),)
    with pytest.raises(ValueError, match="min_share=1.5"):
        select_heads(paths, 4, min_share=1.5)
    with pytest.raises(ValueError, match="min_share=-0.1"):
        DiscoveryConfig(min_share=-0.1)


def test_the_floor_drops_the_heads_of_the_smollm2_search_that_do_nothing():
    """The SmolLM2 search kept in results/: the noise rule passed a21.h7 (-6.9e-5), a5.h2 (-6.9e-6)
    and a1.h5 (-9.6e-7) against a value fetcher's -0.019; the floor, measured against the groups
    searched before, drops exactly these."""
    folder = Path(__file__).parents[1] / "results" / "entity_tracking_smollm2" / "search-teacher"
    scans = {}
    for path in sorted(folder.glob("*.json")):
        kept = json.loads(path.read_text())["value"]
        scans[path.stem] = Scan.from_dict(kept[path.stem])
    groups = {}
    for share in (0.0, 0.01):
        passing = search.passing_heads(scans, search.ET_SEARCH, min_effect="noise",
                                       min_share=share)
        groups[share] = {g: {str(h) for h in heads[:2]} for g, heads in passing.items()}
    kept = json.loads((folder.parent / "circuit-teacher.json").read_text())["groups"]
    assert groups[0.0] == {g: set(heads) for g, heads in kept.items()}
    assert groups[0.0]["position_transmitter"] - groups[0.01]["position_transmitter"] == {"a21.h7"}
    assert groups[0.01]["structure_reader"] == set()
    assert groups[0.01]["value_fetcher"] == groups[0.0]["value_fetcher"]
    assert groups[0.01]["position_detector"] == groups[0.0]["position_detector"]


def test_chance_is_a_guess_among_the_answers_or_the_most_common_one(tok):
    et = tasks.entity_tracking(30, tokenizer=tok, n_boxes=3, seed=1)
    assert tasks.get_task("entity_tracking").chance_accuracy(et) == pytest.approx(1 / 3)
    tom = tasks.theory_of_mind(60, tokenizer=tok, template="compact", seed=1)
    unknown = sum(a == "unknown" for a in tom["answer"]) / len(tom)
    chance = tasks.get_task("theory_of_mind").chance_accuracy(tom)
    assert chance == pytest.approx(max(1 / 3, unknown)) and chance > 1 / 3


# --------------------------------------------------------------------------- the stage-1 check
def test_an_unfaithful_circuit_is_refused_in_one_line_when_it_may_not_grow(pair, tmp_path):
    ctx = context(pair, tmp_path, grow_circuits=False)
    with pytest.raises(UnfaithfulCircuitError) as refused:
        pipeline.find_circuits(ctx)
    message = str(refused.value)
    assert "\n" not in message
    for part in ("the student's circuit (5 heads)", "accuracy 0.396", "full student's 0.500",
                 "faithfulness 0.792", "below --min-faithfulness 0.8", "--grow-circuits"):
        assert part in message, message
    assert not (tmp_path / "circuit-student.json").exists()
    assert (tmp_path / "circuit-teacher.json").exists()  # the teacher's passed
    # cdist discover reports instead of stopping
    found = pipeline.find_circuits(context(pair, tmp_path, grow_circuits=False), refuse=False)
    assert found.student.record["faithfulness"]["verdict"] == "unfaithful"
    assert len(found.heads("student")) == 5


def test_the_command_line_refuses_with_status_2_and_discover_warns(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert cli.main(["match", *ZOO_FLAGS, "--no-grow-circuits", "--out", out]) == 2
    # the scans' progress lines (stderr is not a terminal here), then the refusal, in one line
    err = capsys.readouterr().err.strip().splitlines()
    assert [line.startswith("cdist: error:") for line in err].count(True) == 1, err
    assert "the student's circuit (5 heads)" in err[-1], err
    assert "below --min-faithfulness 0.8" in err[-1]
    assert cli.main(["discover", "--out", out]) == 0  # the folder's settings, growth off
    printed = capsys.readouterr().out
    assert "warning: the student's circuit (5 heads) alone has accuracy" in printed
    settings = (Path(out) / "config.yaml").read_text()
    assert "grow_circuits: false" in settings and "min_share: 0.01" in settings


def test_growth_reaches_the_threshold_and_a_second_call_reuses_it(pair, tmp_path, monkeypatch):
    lines = []
    found = pipeline.find_circuits(context(pair, tmp_path, lines=lines))
    record = found.student.record["faithfulness"]
    assert record["verdict"] == "grown" and record["before"]["faithfulness"] < 0.8
    assert record["after"]["faithfulness"] >= 0.8
    assert record["after"]["heads"] == len(found.heads("student")) > record["before"]["heads"]
    assert all(a["group"] == "circuit" and a["why"].startswith("mean-ablation drop")
               for a in record["added"])
    assert len(found.heads("student")) <= 0.25 * 32
    assert found.teacher.record["faithfulness"]["verdict"] == "faithful"
    written = json.loads((tmp_path / "circuit-student.json").read_text())
    assert Circuit.from_dict(written) == found.of("student")
    assert any("grown to" in line for line in lines)
    # the same circuit, models and items again: read back, not measured
    for name in ("circuit_accuracy", "grow_until_faithful"):
        monkeypatch.setattr(faithfulness, name, None)
    monkeypatch.setattr(stage, "accuracy", None)
    again = pipeline.find_circuits(context(pair, tmp_path))
    assert again.of("student") == found.of("student")
    assert again.student.record["faithfulness"] == record
    # another threshold is another check
    with pytest.raises(TypeError):
        pipeline.find_circuits(context(pair, tmp_path, min_faithfulness=0.85))


def test_a_path_patching_circuit_grows_by_its_groups_then_where_heads_work(pair, tmp_path):
    # one head per group: the second value fetcher is the group's runner-up
    ctx = context(pair, tmp_path / "k1", ("teacher",), min_faithfulness=1.0,
                  discovery=DiscoveryConfig(k=1, min_effect=0.0))
    record = pipeline.find_circuits(ctx, ("teacher",)).teacher.record["faithfulness"]
    assert record["before"]["faithfulness"] < 1.0 <= record["after"]["faithfulness"]
    assert [(a["head"], a["group"]) for a in record["added"]] == [("a1.h4", "value_fetcher")]
    # with no runner-up (a floor of the largest effect itself), heads come by their ablation drop,
    # each in a group at the position where ablating it alone hurts most
    ctx = context(pair, tmp_path / "share1", ("teacher",), min_faithfulness=1.0,
                  discovery=DiscoveryConfig(k=1, min_effect=0.0, min_share=1.0))
    found = pipeline.find_circuits(ctx, ("teacher",))
    added = found.teacher.record["faithfulness"]["added"]
    assert added and all(a["group"].startswith("grown_") for a in added)
    placement = pipeline.place_teacher_heads(ctx, found)
    for a in added:
        position = found.of("teacher").positions[a["group"]]
        assert position == "pos_" + a["group"].removeprefix("grown_")
        assert placement.positions[Head.parse(a["head"])] == position


def test_growth_candidates_come_by_their_ablation_drop_and_runners_up_keep_their_group(
        pair, tmp_path):
    ctx = context(pair, tmp_path, ("teacher",), min_faithfulness=0.0,  # the circuit as found
                  discovery=DiscoveryConfig(k=1, min_effect=0.0))
    found = pipeline.find_circuits(ctx, ("teacher",)).teacher
    candidates = stage._candidates(ctx, "teacher", found)
    drops = stage.ablation_scan(ctx, "teacher", ctx.items.val, "teacher-validation").ranking()
    outside = [h for h in drops.top(drops.scores.numel()) if h not in found.circuit.heads]
    helping = [h for h in outside if drops[h] > 0]
    assert [c.head for c in candidates[:len(helping)]] == helping
    # the rest are runners-up whose ablation costs nothing, each in the group it passed
    assert all(c.group is not None for c in candidates[len(helping):])
    runners = {c.head: c.group for c in candidates if c.group is not None}
    assert runners and set(runners.values()) <= set(found.circuit.groups)
    assert all(h not in found.circuit.groups[g] for h, g in runners.items())


def test_a_model_at_chance_is_refused_and_discover_says_its_circuit_means_nothing(
        model, tok, tmp_path, capsys):
    cfg = replace(SMALL, task_kwargs={"template": "adjacent", "n_boxes": 3})
    ctx = pipeline.Context(cfg, tmp_path / "api", {"teacher": lambda: model}, progress=False,
                           log=lambda _: None)
    with pytest.raises(UnfaithfulCircuitError, match=r"at or below chance \(0\.333\)"):
        pipeline.find_circuits(ctx, ("teacher",))
    record = pipeline.find_circuits(ctx, ("teacher",), refuse=False).teacher.record
    assert record["faithfulness"]["verdict"] == "below chance"
    folder = save_llama(model, tmp_path / "random", tokenizer=tok)
    argv = ["discover", "--teacher", str(folder), "--n-boxes", "3", *ZOO_FLAGS[4:],
            "--out", str(tmp_path / "run")]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "warning: the teacher is at or below chance (0.333) on the test items" in printed
    kept = json.loads((tmp_path / "run" / "discovery-teacher.json").read_text())
    assert kept["test"]["chance"] == pytest.approx(1 / 3) and kept["warnings"]


def test_growth_search_finds_the_smallest_size_by_doubling_and_bisection(monkeypatch):
    """Faithfulness reached at 5 added heads: tried 1, 2, 4, 8, then 6 and 5."""
    heads = [Head(0, i) for i in range(12)]
    seen = []

    def accuracy(model, kept, data, means, batch_size):
        seen.append(len(kept) - 1)
        return 1.0 if len(kept) - 1 >= 5 else 0.5

    monkeypatch.setattr(faithfulness, "circuit_accuracy", accuracy)
    kw = dict(full_accuracy=1.0, threshold=0.9)
    with unchecked():  # no model: the accuracies above stand for it
        n, tried = faithfulness.grow_until_faithful(None, heads[:1], heads, None, None,
                                                    max_heads=12, **kw)
        assert n == 5 and seen == [1, 2, 4, 8, 6, 5] and [t["added"] for t in tried] == seen
        seen.clear()
        n, _ = faithfulness.grow_until_faithful(None, heads[:1], heads, None, None, max_heads=4,
                                                **kw)
        assert n is None and seen == [1, 2, 3]  # the cap: at most 3 heads added to the one
        with pytest.raises(ValueError, match="full_accuracy=0"):
            faithfulness.grow_until_faithful(None, heads[:1], heads, None, None, max_heads=4,
                                             full_accuracy=0, threshold=0.9)
