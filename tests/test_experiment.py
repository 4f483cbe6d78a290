"""The experiment end to end on tiny random Llama checkpoint directories (the real-Llama code
path): arms, regimes, selection on validation items, OOD sets, stored per-item results and the
declared tests."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import unchecked

from cdist import arms, cli, distill, stats
from cdist.cli import common
from cdist.models import keep_layers, new_llama, save_llama
from cdist.pipeline import ExperimentConfig, slug
from cdist.types import Head, HeadPair

ARGS = ["--steps", "4", "--eval-every", "2", "--batch-size", "8", "--lrs", "1e-3", "3e-3",
        "--lambdas", "0.5", "2.0", "--val-items", "24", "--test-items", "40", "--ood-items", "16",
        "--ood-boxes", "3", "--min-effect", "0", "--device", "cpu",
        "--min-faithfulness", "0"]  # random models: no task, no faithfulness to check


def run_table(task: str, argv: list[str]) -> dict:
    """``cdist table --task TASK ARGV``'s summary."""
    return cli.run(["table", "--task", task, *argv])


def checkpoints(tok, tmp_path, roles):
    dirs = {}
    for role, (layers, width, heads, seed) in roles.items():
        model = new_llama(n_layers=layers, d_model=width, n_heads=heads, n_kv_heads=2,
                          d_mlp=2 * width, vocab_size=len(tok), seed=seed, tokenizer=tok)
        dirs[role] = str(save_llama(model, tmp_path / role, tokenizer=tok))
    return dirs


# the primary pair and the secondaries' controls (the golden table runs every default arm)
TABLE_ARMS = ["base student", "teacher", "circuit distilled, CE",
              "circuit distilled, CE + Align CKA", "circuit distilled, CE + Shuffled CKA",
              "circuit distilled, CE + Rand CKA"]


@pytest.mark.slow
def test_experiment_runs_on_checkpoint_directories(tok, tmp_path):
    dirs = checkpoints(tok, tmp_path, {"teacher": (3, 64, 4, 0), "student": (2, 32, 8, 1)})
    figures, out = tmp_path / "figures", tmp_path / "out"
    argv = ["--teacher", dirs["teacher"], "--student", dirs["student"], "--seeds", "0", "1",
            "--regimes", "16", "32", "--select-seed", "7", *ARGS, "--matchers", "ablation",
            "ablation-baseline", "cka-1to1", "--arms", *TABLE_ARMS, "--out", str(out),
            "--figures", str(figures)]
    summary = run_table("entity_tracking", argv)
    assert list(summary["rows"]) == ["n16", "n32"]
    assert list(summary["rows"]["n16"]) == TABLE_ARMS
    assert summary["config"]["task_kwargs"]["template"] == "prakash"
    assert set(summary["teacher_ood"]) == {"3 boxes", "template compact"}
    # selection: every lr for circuit CE, then every matcher x lambda, each with its starting
    # gradient ratio
    sel = summary["selection"]
    assert [r["lr"] for r in sel["lr"]] == [1e-3, 3e-3] and len(sel["align"]) == 3 * 2
    assert all(r["grad_ratio_start"] is not None for r in sel["align"])
    assert summary["lr"] in (1e-3, 3e-3) and summary["lambda"] in (0.5, 2.0)
    chosen = [r for r in sel["align"] if r["matcher"] == sel["chosen"]["matcher"]]
    pulling = [r["lambda"] for r in chosen if r["grad_ratio_start"] >= arms.STRONG_RATIO]
    assert summary["lambda_strong"] == (min(pulling) if pulling else 2.0)
    assert sel["chosen"]["matcher"] in summary["head_maps"]
    assert set(summary["diagnostics"]) == {k + s for k in summary["head_maps"]
                                           for s in ("", " at pos_last")}
    # the pairs are read where the teacher heads work: path patching's groups give their
    # positions
    assert summary["positions_from"] == "circuit groups"
    teacher_groups = summary["circuits"]["teacher"]
    for pair in summary["head_map"]["pairs"]:
        group = next(g for g, heads in teacher_groups["groups"].items() if pair["teacher"] in heads)
        assert (pair["teacher_position"] == teacher_groups["positions"][group]
                == pair["student_position"])
    # per-item results: every run's accuracies and every test are recomputed from the stored
    # strings
    per_item = json.loads((out / "per_item.json").read_text())
    assert len(per_item["runs"]) == 2 * 2 * len(TABLE_ARMS)
    assert per_item["eval_sets"]["test"] == 40
    for run in per_item["runs"]:
        row = summary["rows"][f"n{run['train_items']}"][run["arm"]]
        runs = [r for r in per_item["runs"]
                if r["arm"] == run["arm"] and r["train_items"] == run["train_items"]]
        mean = sum(r["test_full"].count("1") / 40 for r in runs) / len(runs)
        assert row["full_accuracy"]["mean"] == pytest.approx(mean)
        assert len(run["ood"]["3 boxes"]) == 16
    primary = summary["comparisons"][0]
    assert (primary["role"], primary["a"], primary["b"], primary["set"], primary["regime"]) == (
        "primary", *arms.PRIMARY, "test", "n16")
    bits = {name: [torch.tensor([c == "1" for c in r["test_full"]]) for r in sorted(
        (r for r in per_item["runs"] if r["arm"] == name and r["train_items"] == 16),
        key=lambda r: r["seed"])]
        for name in arms.PRIMARY}
    again = stats.compare(bits[arms.PRIMARY[0]], bits[arms.PRIMARY[1]], margin=0.02)
    assert json.dumps(primary["seed_level"]) == json.dumps(again["seed_level"])
    assert primary["clustered"] == again["clustered"] and primary["seeds"] == [0, 1]
    assert all("holm_p" in e for e in summary["comparisons"] if e["role"] == "secondary")
    # the circuit arms train only the student circuit's query/output slices
    assert summary["config"]["distill"]["kv_policy"] == "qo"
    assert summary["trainable_group"]["params"] > summary["trainable"]["params"]
    table = (figures / "table1-entity-tracking.md").read_text()
    assert "Primary comparison (declared before the runs)" in table
    assert "| circuit distilled, CE + Shuffled CKA |" in table
    saved = json.loads((figures / "table1-entity-tracking.json").read_text())
    assert saved["commit"] and saved["command"].endswith(str(figures))
    csv_text = (figures / "table1-entity-tracking.csv").read_text()
    assert csv_text.startswith("train_items,arm,full_accuracy_mean")
    for name in ("val-ce", "val-accuracy", "head-map", "head-map-links"):
        assert (figures / f"table1-entity-tracking-{name}.html").exists()
    # a second call reuses every finished run and gives the same table
    again = run_table("entity_tracking", argv)
    assert again["rows"] == summary["rows"]


@pytest.mark.slow
def test_a_student_cut_from_its_teacher_gets_the_homolog_map_and_arm(tok, tmp_path):
    """The student is the teacher without its middle layer: every map reports its homolog
    recovery, the homolog map pairs each student circuit head with the head it descends from, and
    the homolog arm trains on it; the random control keeps the aligned map's shape outside the
    teacher's circuit."""
    teacher = new_llama(n_layers=3, d_model=32, n_heads=4, n_kv_heads=2, d_mlp=64,
                        vocab_size=len(tok), seed=0, tokenizer=tok)
    dirs = {"teacher": save_llama(teacher, tmp_path / "teacher", tokenizer=tok),
            "student": save_llama(keep_layers(teacher, [0, 2]), tmp_path / "student",
                                  tokenizer=tok)}
    homolog_arm = "circuit distilled, CE + Align CKA (homolog)"
    argv = ["--teacher", str(dirs["teacher"]), "--student", str(dirs["student"]), "--seeds", "0",
            "--regimes", "16", *ARGS, "--lrs", "1e-3", "--lambdas", "0.5",
            "--matchers", "cka-1to1", "--min-faithfulness", "0", "--out", str(tmp_path / "out"),
            "--figures", str(tmp_path / "figures"), "--arms", "circuit distilled, CE",
            "circuit distilled, CE + Align CKA", homolog_arm, "circuit distilled, CE + Rand CKA"]
    summary = run_table("entity_tracking", argv)
    assert set(summary["head_maps"]) == {"cka-1to1", "homolog"}
    origin = (0, 2)
    for name in ("cka-1to1", "homolog"):
        found = summary["diagnostics"][name]["homolog_recovery"]
        assert found["pairs"] == len({(p["student"], p["teacher"])
                                      for p in summary["head_maps"][name]["pairs"]})
    assert summary["diagnostics"]["homolog"]["homolog_recovery"]["recovery"] == 1.0
    for pair in summary["head_maps"]["homolog"]["pairs"]:
        s, t = Head.parse(pair["student"]), Head.parse(pair["teacher"])
        assert (t.layer, t.head) == (origin[s.layer], s.head)
    runs = tmp_path / "out" / "runs" / "n16"
    trained = json.loads((runs / f"{slug(homolog_arm)}-seed0" / "eval.json").read_text())
    assert trained["pairs"] == [str(HeadPair.from_dict(p)) for p in
                                summary["head_maps"]["homolog"]["pairs"]]
    rand = json.loads((runs / "circuit_distilled-CE+Rand_CKA-seed0" / "eval.json").read_text())
    circuit = {h for heads in summary["circuits"]["teacher"]["groups"].values() for h in heads}
    assert len(rand["pairs"]) == len(summary["head_map"]["pairs"])
    assert not {p.split("-> ")[-1].split("@")[0] for p in rand["pairs"]} & circuit


def test_arms_build_their_runs():
    strong = [a.name for a in arms.ARMS if a.strong]
    assert strong == ["circuit distilled, CE + Align CKA (strong)",
                      "circuit distilled, CE + Shuffled CKA (strong)"]
    base = distill.DistillConfig(steps=10)
    cfg = {a.name: a.config(base, lam=0.7, lr=1e-3, control_lr=1e-4, seed=3)
           for a in arms.ARMS if a.trained}
    assert cfg["circuit distilled, CE + Shuffled CKA"].shuffle_teacher
    assert not cfg["circuit distilled, CE + Align CKA"].shuffle_teacher
    for name in ("circuit distilled, CE + Align CKA", "circuit distilled, CE + Shuffled CKA",
                 "circuit distilled, CE + Rand CKA"):
        assert (cfg[name].cka_weight, cfg[name].ce_weight, cfg[name].lr) == (0.7, 1.0, 1e-3)
    assert cfg["circuit distilled, CE"].cka_weight == 0.0
    assert cfg["fully distilled, CE"].trainable == "all"
    assert cfg["circuit distilled, KD"].kd_weight == 1.0
    assert cfg["circuit distilled, KD"].ce_weight == 0.0
    control = cfg["positive control, Shuffled CKA (small lr)"]
    assert (control.lr, control.ce_weight, control.shuffle_teacher) == (1e-4, 0.0, True)
    assert all(c.seed == 3 for c in cfg.values())
    with pytest.raises(ValueError, match="unknown arm"):
        arms.arm("circuit distilled, CE + Magic")


@pytest.mark.parametrize(("changes", "message"), [
    ({"task": "greater_than"}, "unknown task 'greater_than'"),
    ({"matchers": ("magic",)}, "matchers ['magic']; choose from"),
    ({"arms": ("CE + Magic",)}, "unknown arm 'CE + Magic'"),
    ({"seeds": ()}, "seeds, regimes, lrs and lambdas each need at least one value"),
    ({"select_seed": 0}, "select_seed 0 is a table seed"),
    ({"val_items": 0}, "val_items=0; it must be at least 1"),
    ({"regimes": (128, 0)}, "regimes [0], lrs/lambdas/control_lr []: each must be positive"),
    ({"lambdas": (0.1, -1.0)}, "regimes [], lrs/lambdas/control_lr [-1.0]"),
    ({"teacher_positions": {"k6": "pos_last"}}, "'k6' is not a head name"),
    ({"teacher_positions": {"a0.h1": "last"}}, "teacher_positions['a0.h1'] = 'last': name a"),
    ({"seeds": (0, 0)}, "seeds=(0, 0) repeats a value"),
    ({"regimes": (16, 16)}, "regimes=(16, 16) repeats a value"),
    ({"seeds": (0.5,)}, "seeds=(0.5,): give whole numbers"),
    ({"lrs": (float("inf"),)}, "each must be a finite number"),
    ({"matchers": ("homolog",)}, "the homolog map is an arm of its own"),
    ({"margin": 0.0}, "margin 0.0 and alpha 0.05: each must be between 0 and 1"),
    ({"fingerprints": {"teacher": "abc"}}, "give a teacher's or student's 64-digit hex"),
])
def test_experiment_config_refuses_bad_values_before_any_model(changes, message):
    with unchecked(), pytest.raises(ValueError, match=re.escape(message)):
        ExperimentConfig(**{"task": "entity_tracking", **changes})


def test_bad_input_is_one_line(tok, tmp_path, capsys):
    """Stale run folders, unknown columns, arms and position names stop the script with one line."""
    dirs = checkpoints(tok, tmp_path, {"teacher": (2, 32, 4, 0), "student": (2, 32, 4, 1),
                                       "other": (2, 32, 4, 2)})
    argv = ["--teacher", dirs["teacher"], "--seeds", "0", "--regimes", "16", *ARGS, "--lrs", "1e-3",
            "--lambdas", "0.5", "--matchers", "ablation", "--out", str(tmp_path / "out"),
            "--figures", str(tmp_path / "figures"), "--arms", "circuit distilled, CE"]
    run_table("entity_tracking", ["--student", dirs["student"], *argv])
    bad = [(["--student", dirs["other"]], "holds results made with other settings (student: "),
           (["--student", dirs["student"], "--cka-position", "pos_nowhere"],
            "cka_position = 'pos_nowhere' is not a position column"),
           (["--student", dirs["student"], "--arms", "CE + Magic"], "unknown arm 'CE + Magic'"),
           (["--student", dirs["student"], "--teacher-positions", "a0.h1"], "write HEAD=COLUMN"),
           (["--student", dirs["student"], "--select-seed", "0"], "select_seed 0 is a table seed")]
    for extra, message in bad:
        code = cli.main(["table", "--task", "entity_tracking", *argv, *extra])
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err
        assert message in err.strip().splitlines()[-1]


def test_item_flags_reach_the_items_and_checkpoints_get_the_pretrained_lrs(tok, tmp_path,
                                                                          monkeypatch):
    from cdist.tasks.entity_tracking import LABELS, OBJECTS

    dirs = checkpoints(tok, tmp_path, {"teacher": (2, 32, 4, 0), "student": (2, 32, 4, 1)})
    args = [a for a in ARGS if a not in ("--lrs", "1e-3", "3e-3")]
    objects, labels = list(OBJECTS[:4]), list(LABELS[:5])
    argv = ["--teacher", dirs["teacher"], "--student", dirs["student"], "--seeds", "0",
            "--regimes", "16", *args, "--lambdas", "0.5", "--matchers", "ablation",
            "--arms", "base student", "--n-boxes", "4", "--template", "compact", "--objects",
            *objects, "--labels", *labels, "--reference-items", "12", "--discovery-items", "10",
            "--n-random", "2", "--data-seed", "3", "--prefilter", "3",
            "--out", str(tmp_path / "out"),
            "--figures", str(tmp_path / "figures")]
    summary = run_table("entity_tracking", argv)
    cfg = summary["config"]
    assert cfg["task_kwargs"] == {"template": "compact", "n_boxes": 4, "objects": objects,
                                  "labels": labels}
    assert cfg["discovery"]["prefilter"] == cfg["student_discovery"]["prefilter"] == 3
    assert (cfg["reference_items"], cfg["discovery_items"], cfg["n_random"],
            cfg["data_seed"]) == (12, 10, 2, 3)
    assert tuple(cfg["lrs"]) == common.LRS["pretrained"]
    assert cfg["control_lr"] == common.CONTROL_LR["pretrained"]
    assert [r["lr"] for r in summary["selection"]["lr"]] == list(common.LRS["pretrained"])
    # the items are what the flags say: every test prompt holds 4 of the given objects
    decoded = [tok.decode(ids) for ids in _test_items_of_config(summary, tok)]
    assert all(sum(o in text.split() for o in objects) == 4 for text in decoded)
    # a second call redoes no scan: the ablation scans and the search's groups are saved
    from cdist.discovery import ablation, circuit_eval, search

    def no_scan(*args, **kwargs):
        raise AssertionError("a saved scan was computed again")

    monkeypatch.setattr(ablation, "head_ablation_scan", no_scan)
    monkeypatch.setattr(search, "path_patching_scan", no_scan)
    # nor an evaluation: the untrained rows (base student, teacher) are kept as the runs are
    monkeypatch.setattr(circuit_eval, "evaluate_circuit", no_scan)
    again = run_table("entity_tracking", argv)
    assert again["circuits"] == summary["circuits"] and again["rows"] == summary["rows"]


def _test_items_of_config(summary, tok):
    """The test items that the recorded config makes (what the run evaluated on)."""
    from cdist.pipeline import ExperimentConfig, make_items

    cfg = summary["config"]
    keep = ("task", "task_kwargs", "test_items", "data_seed")
    data = make_items(ExperimentConfig(**{k: cfg[k] for k in keep}), tok)
    return data.test["input_ids"]


@pytest.mark.slow
def test_theory_of_mind_places_pairs_where_teacher_heads_work(tok, tmp_path):
    """A ranked (mean-ablation) teacher circuit gets each head's position from its largest ablation
    effect, among the columns every item has (stories without a visibility sentence have no
    pos_visibility)."""
    dirs = checkpoints(tok, tmp_path, {"teacher": (2, 32, 4, 0), "student": (2, 32, 4, 1)})
    at = ARGS.index("--ood-boxes")  # theory of mind has no boxes: the flag is refused there
    argv = ["--teacher", dirs["teacher"], "--student", dirs["student"], "--seeds", "0",
            "--regimes", "16", *ARGS[:at], *ARGS[at + 2:], "--lrs", "1e-3", "--lambdas", "0.5",
            "--matchers", "cka",
            "--arms", "circuit distilled, CE", "circuit distilled, CE + Align CKA",
            "--out", str(tmp_path / "out"), "--figures", str(tmp_path / "fig")]
    summary = run_table("theory_of_mind", argv)
    assert summary["positions_from"] == "largest ablation effect"
    teacher_circuit = summary["circuits"]["teacher"]["groups"]["circuit"]
    assert set(summary["teacher_positions"]) == set(teacher_circuit)
    assert set(summary["teacher_positions"].values()) <= {"pos_last", "pos_query_character",
                                                          "pos_query_container"}
    assert summary["teacher_ood"] == {}
    assert (tmp_path / "fig" / "table2-theory-of-mind.md").exists()
