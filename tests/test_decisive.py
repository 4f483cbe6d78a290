"""``experiments/smollm2_decisive.py``: at its full scale it makes the configs its committed
pilots and tables were made with; at the toy sizes of ``--smoke``, on the entity-tracking teacher
organism and a student cut from it (as the SmolLM2 student is cut from its teacher), it runs its
pilot and then the table the pilot plans: the table reuses the pilot's circuits, scans and
selection runs, chooses again what the pilot chose, trains every arm on the planned seeds and
writes its report, a second call trains nothing, and ``status`` counts every step's runs."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from cdist import arms, pipeline, power, zoo
from cdist.models import keep_layers, load_llama, save_llama
from cdist.pipeline.runs import unbits
from cdist.store import model_fingerprint

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "smollm2_decisive.py"


def _models(root):
    """A models folder as ``experiments/smollm2_models.py`` writes it: each role's checkpoint,
    fingerprint and (the student's) layers kept from the teacher."""
    teacher, tok = zoo.load("et-teacher")
    record = {}
    for role, model, kept in (("teacher", teacher, None),
                              ("student", keep_layers(teacher, [1]), [1])):
        path = save_llama(model, root / role / "model", tokenizer=tok)
        record[role] = {"path": str(path), "fingerprint": model_fingerprint(load_llama(path)),
                        "kept_layers": kept}
    (root / "models.json").write_text(json.dumps({"task": "entity_tracking", "models": record}))
    return root


def _step(step: str, models, out) -> str:
    """A step in its own process, as a user runs it (its threads and numerics its own)."""
    done = subprocess.run([sys.executable, str(SCRIPT), step, "--models", str(models), "--out",
                           str(out), "--threads", "1", "--smoke"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


def _here(monkeypatch, capsys, step: str, models, out, *flags: str) -> tuple[int, str]:
    """A step run in this process (its refusals and ``status`` load no model, so they need no
    process of their own): its exit status and what it printed."""
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), step, "--models", str(models), "--out",
                                      str(out), *flags])
    capsys.readouterr()
    try:
        runpy.run_path(str(SCRIPT), run_name="__main__")
        status = 0
    except SystemExit as stop:
        status = stop.code
    printed = capsys.readouterr()
    return status, printed.out + printed.err


# the committed folders, and the committed runs whose training settings the table must repeat
COMMITTED = [("ioi", "pilot"), ("ioi", "table"), ("entity_tracking", "pilot")]


def _script(task: str, step: str, tmp_path, monkeypatch) -> tuple[dict, dict]:
    """The script's functions at full scale, on a models record with the committed folder's
    fingerprints; and that folder's ``identity.json``."""
    kept = json.loads((ROOT / "results" / f"{task}_smollm2_decisive" / step /
                       "identity.json").read_text())
    models = {role: {"fingerprint": kept["models"][role], "path": kept[role],
                     "kept_layers": None if role == "teacher" else [*range(12), *range(20, 30)]}
              for role in ("teacher", "student")}
    (tmp_path / "models.json").write_text(json.dumps({"models": models}))
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), step, "--task", task, "--models",
                                      str(tmp_path)])
    return runpy.run_path(str(SCRIPT), run_name="decisive"), kept  # steps run only as __main__


@pytest.mark.parametrize("task, step", COMMITTED)
def test_full_scale_makes_the_committed_folders(task, step, tmp_path, monkeypatch):
    """A change of the full scale's sizes, rules or items would orphan days of stored runs: the
    script's configs are the ones the committed folders record (``identity.json``, and the
    table's runs' training settings)."""
    results = ROOT / "results" / f"{task}_smollm2_decisive"
    script, kept = _script(task, step, tmp_path, monkeypatch)
    pilot = (json.loads((results / "pilot" / "pilot.json").read_text()) if step == "table"
             else None)
    cfg = script["table_config"](pilot) if pilot else script["pilot_config"]()
    names = {role: kept[role] for role in ("teacher", "student")}
    made = json.loads(json.dumps(pipeline.folder_identity(cfg, names)))  # tuples as JSON lists
    assert made == {k: v for k, v in kept.items() if k != "models"}
    assert cfg.fingerprints == kept["models"]
    # the grid's, selection's and the table's runs (none yet where a pilot has not trained)
    for run in (results / step).glob("**/eval.json"):
        trained = json.loads(run.read_text())["config"]
        assert trained["eval_every"] == cfg.distill.eval_every, run
        assert trained["batch_size"] == cfg.distill.batch_size, run
        if run.parts[-3] == "runs":  # the table's own
            assert trained["steps"] == cfg.distill.steps and trained["seed"] in cfg.seeds, run
            assert trained["lr"] in (*cfg.lrs, cfg.control_lr), run


@pytest.mark.slow
def test_the_pilot_plans_a_table_that_reuses_its_choices(tmp_path, monkeypatch, capsys):
    models, out = _models(tmp_path / "models"), tmp_path / "out"
    into = ROOT / "results" / "smoke"
    status, said = _here(monkeypatch, capsys, "pilot", models, into, "--smoke")
    assert status == 2 and "not a result" in said
    assert not into.exists()
    status, said = _here(monkeypatch, capsys, "table", models, out, "--smoke")
    assert status == 2 and "run the pilot step first" in said
    status, said = _here(monkeypatch, capsys, "pilot", tmp_path, out, "--smoke")  # no models.json
    assert status == 2 and "make the models first" in said
    log = _step("pilot", models, out)
    assert "path patching" in log and "mean-ablation scan" in log  # the circuits, found here
    pilot = json.loads((out / "pilot" / "pilot.json").read_text())
    # SMOKE: a 2 x 1 headroom grid, two pilot seeds, test sizes 24 or 32, two table seeds
    assert [(r["train_items"], r["lr"]) for r in pilot["grid"]] == [(8, 1e-3), (16, 1e-3)]
    assert pilot["chosen"]["train_items"] in (8, 16) and pilot["chosen"]["steps"] == 4
    assert pilot["power"]["seeds"] == [201, 202] and pilot["power"]["validation_items"] == 24
    assert pilot["design"]["seeds"] == [0, 1] and pilot["design"]["test_items"] in (24, 32)
    assert 0 <= pilot["design"]["planned_power"] <= 1
    # the one-to-one rules and the homolog map, which finds every student head's own head
    assert set(pilot["homolog_recovery"]) == {"ablation-1to1", "ablation-baseline-1to1",
                                              "cka-1to1", "homolog"}
    assert pilot["homolog_recovery"]["homolog"]["recovery"] == 1.0
    # the OOD sets: the candidates' teacher accuracies, and the fixed template set always taken
    assert set(pilot["ood"]["teacher"]) == {"10 boxes", "9 boxes", "8 boxes"}
    assert pilot["ood"]["sets"][-1] == ["template compact", {"template": "compact"}]
    sel = pilot["selection"]
    assert {r["lambda"] for r in sel["align"]} == {0.03, 0.1} and len(sel["align"]) == 3 * 2

    # a full table refuses the smoke pilot before it loads a model
    status, said = _here(monkeypatch, capsys, "table", models, out)
    assert status == 2 and "run both steps with --smoke" in said
    assert not (out / "table").exists()

    log = _step("table", models, out)
    table = json.loads((out / "table" / "results.json").read_text())
    # the pilot's choices, chosen again on the pilot's selection runs (none trained again) ...
    for key in ("lr", "lambda", "lambda_strong"):
        assert table[key] == sel["chosen"][key]
    assert table["selection"]["chosen"]["matcher"] == sel["chosen"]["matcher"]
    assert "path patching" not in log and "mean-ablation scan" not in log  # the pilot's
    # ... and every trained arm on the planned seeds, the untrained rows evaluated once each
    trained = [name for name in table["rows"][f"n{pilot['chosen']['train_items']}"]
               if arms.arm(name).trained]
    assert len(trained) == 11 and log.count("distill: done") == 11 * 2
    per_item = json.loads((out / "table" / "per_item.json").read_text())
    assert per_item["eval_sets"]["test"] == pilot["design"]["test_items"]
    assert sorted({r["seed"] for r in per_item["runs"]}) == [0, 1]
    assert set(per_item["eval_sets"]) >= {"test", *(label for label, _ in pilot["ood"]["sets"])}
    primary = next(c for c in table["comparisons"] if c["role"] == "primary")
    assert (primary["a"], primary["b"], primary["set"]) == (*arms.PRIMARY, "test")
    assert primary["seed_level"]["n_seeds"] == 2
    # the power the table had for a 2-point difference, from its own primary pair's variance
    powered = json.loads((out / "table" / "power.json").read_text())
    assert (powered["seeds"], powered["test_items"]) == (2, pilot["design"]["test_items"])
    assert 0 <= powered["achieved_power"] <= 1
    assert powered["planned_power"] == pilot["design"]["planned_power"]
    # the report: the tables with the declared primary first, and the figures
    assert "Primary comparison (declared" in (out / "table" / "table.md").read_text()
    assert (out / "table" / "table.csv").read_text().count("\n") == 1 + len(trained) + 2
    for name in ("val-ce", "val-accuracy", "head-map", "head-map-links"):
        assert (out / "table" / f"table-{name}.png").stat().st_size > 0

    again = _step("table", models, out)
    assert "distill: done" not in again
    status = _here(monkeypatch, capsys, "status", models, out, "--smoke")[1].splitlines()
    assert status[:4] == ["headroom grid: 2/2 runs", "selection: 7/7 runs", "power: 4/4 runs",
                          "table: 22/22 runs"]
    assert status[-1].startswith("table: done")
    assert json.loads((out / "table" / "results.json").read_text())["rows"] == table["rows"]


def test_the_ioi_pilots_power_recomputes_from_its_runs(tmp_path, monkeypatch):
    """The variance and discordance behind the IOI table's size come again from the pilot's
    stored power runs; the achieved power of a table made of those runs is the variance model's
    power at their design (4 seeds, 500 items)."""
    script, _ = _script("ioi", "pilot", tmp_path, monkeypatch)
    folder = ROOT / "results" / "ioi_smollm2_decisive" / "pilot"
    pilot = json.loads((folder / "pilot.json").read_text())
    runs = [{"arm": name, "seed": seed, "train_items": pilot["chosen"]["train_items"],
             "test_full": json.loads((folder / "power" / f"{pipeline.slug(name)}-seed{seed}" /
                                      "eval.json").read_text())["test_full"]}
            for name in arms.PRIMARY for seed in pilot["power"]["seeds"]]
    bits = {name: [unbits(r["test_full"]) for r in runs if r["arm"] == name]
            for name in arms.PRIMARY}
    found = json.loads(json.dumps(script["variance_of"](bits)))
    for key in ("run_variance", "discordance_alternative"):
        assert found[key] == pytest.approx(pilot["power"][key]), key
    powered = script["achieved_power"](pilot, runs)
    assert (powered["seeds"], powered["test_items"]) == (4, 500)
    assert powered["achieved_power"] == pytest.approx(power.design_power(
        0.02, pilot["power"]["run_variance"]["run_var"], pilot["power"]["discordance_alternative"],
        500, 4))
