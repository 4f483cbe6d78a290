"""The ``cdist`` command: fast help, the pipeline step by step on one run folder, settings carried
from step to step and from config files, and models of other tokenizers refused (the catalogue of
other refusals: test_bad_inputs.py)."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cdist import cli
from cdist.models import new_llama, save_llama

STEPS = ("discover", "match", "distill", "evaluate", "table")
SMALL = ["--val-items", "24", "--test-items", "40", "--ood-items", "16", "--reference-items", "32",
         "--discovery-items", "24", "--ood-boxes", "3", "--n-random", "2", "--min-effect", "0",
         "--min-faithfulness", "0", "--device", "cpu"]  # random models: no task, no faithfulness


def test_help_answers_without_the_heavy_libraries():
    """Every subcommand's parser and help are built from the standard library and cdist's light
    modules, which is what keeps ``--help`` under a second."""
    code = ("import sys, contextlib, io\n"
            "from cdist import cli\n"
            "for argv in ([], ['zoo'], ['zoo', 'train'], ['zoo', 'circuits'], ['demo'],\n"
            f"             *[[s] for s in {STEPS!r}]):\n"
            "    with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "        try:\n"
            "            cli.parser().parse_args([*argv, '--help'])\n"
            "        except SystemExit:\n"
            "            pass\n"
            "    assert 'usage: cdist' in out.getvalue(), argv\n"
            "    if argv and argv != ['zoo']:\n"
            "        assert 'example' in out.getvalue(), argv\n"
            "print(sorted(m for m in ('torch', 'datasets', 'transformer_lens', 'transformers')\n"
            "             if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def dirs(tok, tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    made = {}
    for role, (layers, width, heads, seed) in {"teacher": (2, 32, 4, 0),
                                               "student": (2, 32, 4, 1)}.items():
        model = new_llama(n_layers=layers, d_model=width, n_heads=heads, n_kv_heads=2,
                          d_mlp=2 * width, vocab_size=len(tok), seed=seed, tokenizer=tok)
        made[role] = str(save_llama(model, root / role, tokenizer=tok))
    return made


def test_pipeline_steps_share_one_run_folder(dirs, tmp_path, capsys, monkeypatch):
    from cdist.pipeline import circuits, head_maps

    out = tmp_path / "run"
    models = ["--teacher", dirs["teacher"], "--student", dirs["student"]]
    found = cli.run(["discover", *models, *SMALL, "--out", str(out)])
    assert set(found) == {"teacher", "student"}
    for role in found:
        record = json.loads((out / f"discovery-{role}.json").read_text())
        assert record["heads"] and 0 <= record["test"]["full_accuracy"] <= 1
        assert (out / f"circuit-{role}.json").is_file()
    assert set(json.loads((out / "discovery-teacher.json").read_text())["positions"]) == \
        set(found["teacher"]["heads"])
    assert list((out / "figures").glob("teacher-path_patching_*.html"))
    # the folder remembers the models and the items: the next steps need neither
    settings = yaml.safe_load((out / "config.yaml").read_text())
    assert settings["teacher"] == dirs["teacher"] and settings["val_items"] == 24
    # the later steps reuse the circuits the folder keeps, and each matcher's map once made
    searched, matched = [], []
    real_search, methods = circuits._search, dict(head_maps.METHODS)
    monkeypatch.setattr(circuits, "_search",
                        lambda *a: searched.append(a[1]) or real_search(*a))
    monkeypatch.setattr(head_maps, "METHODS", {
        name: (lambda *a, name=name: matched.append(a[-1].name) or methods[name](*a))
        for name in methods})
    capsys.readouterr()
    maps = cli.run(["match", "--matchers", "ablation", "--out", str(out)])
    # the step says which settings it took from the folder, as the flags that would set them
    err = capsys.readouterr().err.splitlines()
    # making a map shows progress: made, diagnosed, diagnosed at the last token
    assert "head maps: 3 parts" in err
    assert any(line.startswith("head maps: done, 3/3 parts") for line in err), err
    said = [line for line in err if "settings kept" in line]
    assert len(said) == 1 and said[0].startswith(f"cdist match: settings kept in {out}/config.yaml")
    assert "--val-items 24" in said[0] and "--min-effect 0.0 " in said[0]
    assert f"--teacher {dirs['teacher']}" in said[0] and "--matchers" not in said[0].split(";")[0]
    assert said[0].split("; given: ")[1].startswith("--matchers ablation --out")
    assert list(maps) == ["ablation"] and (out / "head_maps" / "ablation.json").is_file()
    assert (out / "diagnostics.json").is_file()
    # the views are rewritten as maps come and go: a stale map's view goes, a user's file stays
    (out / "head_maps" / "notes.json").write_text('{"mine": 1}')
    (out / "head_maps" / "old.json").write_text((out / "head_maps" / "ablation.json").read_text())
    run = cli.run(["distill", "--out", str(out), "--steps", "2", "--eval-every", "1",
                   "--batch-size", "8", "--train-items", "16", "--lr", "1e-3", "--lam", "0.5"])
    cli.run(["distill", "--out", str(out), "--steps", "2", "--eval-every", "1", "--batch-size",
             "8", "--train-items", "16", "--lr", "1e-3", "--lam", "0.5", "--matcher", "cka",
             "--seed", "1"])
    assert searched == [] and matched == ["ablation", "cka"]
    assert sorted(p.stem for p in (out / "head_maps").glob("*.json")) == ["ablation", "cka",
                                                                          "notes"]
    assert (out / "head_maps" / "notes.json").read_text() == '{"mine": 1}'
    assert set(json.loads((out / "diagnostics.json").read_text())) == {
        "ablation", "ablation at pos_last", "cka", "cka at pos_last"}
    run_dir = out / "runs" / "n16" / "circuit_distilled-CE+Align_CKA-seed0"
    assert (run_dir / "eval.json").is_file() and (run_dir / "metrics.csv").is_file()
    assert run["config"]["cka_weight"] == 0.5 and run["config"]["lr"] == 1e-3
    assert run["heads"] == found["student"]["heads"]
    capsys.readouterr()
    result = cli.run(["evaluate", "--out", str(out)])
    printed = [line for line in capsys.readouterr().out.splitlines() if ": full " in line]
    assert set(result["models"]) == {"teacher", "student"}
    # every model and run with its out-of-distribution accuracy, printed as kept
    saved = json.loads((run_dir / "eval.json").read_text())
    ood = {k: bits.count("1") / len(bits) for k, bits in saved["ood"].items()}
    assert list(ood) == ["3 boxes", "template compact"] and len(saved["ood"]["3 boxes"]) == 16
    assert result["runs"]["runs/n16/circuit_distilled-CE+Align_CKA-seed0"]["ood_accuracy"] == ood
    assert len(printed) == 4 and all(", OOD 3 boxes " in line for line in printed)
    assert printed[2].endswith(f"OOD 3 boxes {ood['3 boxes']:.3f}, OOD template compact "
                               f"{ood['template compact']:.3f}")
    assert list(result["runs"]) == ["runs/n16/circuit_distilled-CE+Align_CKA-seed0",
                                    "runs/n16/circuit_distilled-CE+Align_CKA-seed1"]
    assert result["runs"]["runs/n16/circuit_distilled-CE+Align_CKA-seed0"]["full_accuracy"] == \
        run["full_accuracy"]
    assert searched == []
    log = (out / "commands.log").read_text().splitlines()
    assert len(log) == 5
    page = cli.run(["report", str(out)]).read_text()
    assert cli.run(["report", "--out", str(out)]) == out / "report.html"  # as the steps name it
    for section in ("results", "circuits", "head-maps", "training", "diagnostics",
                    "settings-and-commits"):
        assert f'id="{section}"' in page
    # the results: the teacher, the base student and both runs, each run's change over the base
    # student and its pair CKA before and after training
    results = page.split('id="results"')[1].split("</section>")[0]
    assert results.count("<tr>") == 5 and "<th>OOD: template compact</th>" in results
    base = result["models"]["student"]["full_accuracy"]
    assert f"<td>{run['full_accuracy'] - base:+.3f}</td>" in results
    first, last = saved["metrics"][0]["cka_val_mean"], saved["metrics"][-1]["cka_val_mean"]
    assert f"{first:.3f} → {last:.3f} ({last - first:+.3f})" in results
    # every saved scan, every searched group of the teacher, the two head maps as heatmaps and
    # as links, the training
    figures = len(list((out / "scans").glob("*.json"))) + len(list(out.glob("search-teacher/*")))
    assert page.count('class="figure"') == figures + 5
    assert log[0].split(" ", 3)[3] == shlex.join(["cdist", "discover", *models, *SMALL, "--out",
                                                   str(out)])
    # naming one model discovers that one only
    capsys.readouterr()
    only = cli.run(["discover", "--teacher", dirs["teacher"], "--out", str(out)])
    assert list(only) == ["teacher"] and only["teacher"] == found["teacher"]


def test_a_run_folder_config_re_makes_its_step(dirs, tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    models = ["--teacher", dirs["teacher"], "--student", dirs["student"]]
    a = cli.run(["discover", *models, *SMALL, "--roles", "student", "--out", str(first)])
    b = cli.run(["discover", "--config", str(first / "config.yaml"), "--roles", "student",
                 "--out", str(second)])
    assert a == b


def test_config_files_set_flags_and_flags_win(dirs, tmp_path):
    toml = tmp_path / "settings.toml"
    toml.write_text(f'teacher = "{dirs["teacher"]}"\nstudent = "{dirs["student"]}"\n'
                    'val-items = 20\ntest_items = 30\n'
                    'discovery_items = 24\nreference_items = 32\nood_items = 8\n'
                    'min_effect = "0"\nn_random = 1\n')
    out = tmp_path / "run"
    cli.run(["discover", "--config", str(toml), "--test-items", "36", "--roles", "teacher",
             "--out", str(out)])
    settings = yaml.safe_load((out / "config.yaml").read_text())
    assert (settings["val_items"], settings["test_items"]) == (20, 36)


def test_models_of_other_tokenizers_are_refused_before_they_load(dirs, tok, tmp_path, capsys):
    from cdist import tasks
    from cdist.tokenizers import word_tokenizer

    words = tasks.organism_vocabulary()
    shuffled = word_tokenizer([*words[1:], words[0]])  # the same words, other ids
    smaller = word_tokenizer(words[:-10])
    for name, other, message in (("shuffled", shuffled, "other tokenizers: vocabularies"),
                                 ("smaller", smaller, "output tokens")):
        model = new_llama(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_mlp=64,
                          vocab_size=len(other), seed=1, tokenizer=other)
        student = save_llama(model, tmp_path / name, tokenizer=other)
        capsys.readouterr()
        code = cli.main(["discover", "--teacher", dirs["teacher"], "--student", str(student),
                         "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0], err
        assert not (tmp_path / "out").exists()


def test_every_flag_of_every_step_is_a_typed_setting():
    """A step's settings are one ``RunSettings`` record: a flag without its field would fail when
    that step parses, so every flag of every step is checked here at once."""
    from dataclasses import fields

    from cdist.cli import steps
    from cdist.cli.parser import Parser
    from cdist.cli.settings import RunSettings

    known = {f.name for f in fields(RunSettings)}
    for name in STEPS:
        p = Parser(prog=f"cdist {name}")
        steps._configure(p, name)
        assert p.flags and set(p.flags) <= known, name


def test_a_run_folder_config_sets_any_of_its_steps(tmp_path):
    """A run folder's config.yaml holds every step's settings: ``--config`` of it to a step that
    takes fewer leaves the others to their steps, while a key no step takes is refused."""
    from cdist.cli import settings, steps
    from cdist.cli.flags import UsageError
    from cdist.cli.parser import Parser

    p = Parser(prog="cdist evaluate")
    steps._configure(p, "evaluate")
    config = tmp_path / "config.yaml"
    config.write_text("steps: 5\nseeds: [0, 1]\nval_items: 30\nmin_effect: 0.01\n")
    s = settings.parse(p, ["--config", str(config), "--out", str(tmp_path / "x")], "evaluate")
    assert (s.val_items, s.min_effect, s.steps, s.seeds) == (30, 0.01, None, None)
    config.write_text("val_items: 30\nstepz: 5\n")
    with pytest.raises(UsageError, match="unknown setting 'stepz'"):
        settings.parse(p, ["--config", str(config), "--out", str(tmp_path / "x")], "evaluate")


def test_one_model_named_as_teacher_and_student_has_one_loader(dirs, tmp_path):
    """So that the run context loads (and, for a GGUF file, de-quantizes) it once."""
    from cdist.cli import common, settings, steps
    from cdist.cli.parser import Parser

    p = Parser(prog="cdist match")
    steps._configure(p, "match")

    def loaders(teacher, student):
        s = settings.parse(p, ["--teacher", teacher, "--student", student, *SMALL, "--out",
                               str(tmp_path / "out")], "match")
        return common.context(s).loaders

    same = loaders(dirs["teacher"], dirs["teacher"])
    assert same["teacher"] is same["student"]
    other = loaders(dirs["teacher"], dirs["student"])
    assert other["teacher"] is not other["student"]


def test_without_out_a_step_writes_outside_the_committed_results(monkeypatch):
    """The command's default folder is runs/<task> (out of git); the table scripts, which remake
    the committed tables, write to results/<task> unless given another --out."""
    from cdist.cli import settings, steps
    from cdist.cli.parser import Parser

    p = Parser(prog="cdist match")
    steps._configure(p, "match")
    assert settings.parse(p, ["--task", "theory_of_mind"], "match").out == "runs/theory_of_mind"
    assert "/runs/" in (Path(__file__).parents[1] / ".gitignore").read_text().split()
    seen = []
    monkeypatch.setattr(cli, "main", lambda argv: seen.append(argv) or 0)
    cli.table_script("entity_tracking", ["--seeds", "0"])
    assert seen == [["table", "--task", "entity_tracking", "--out", "results/entity_tracking",
                     "--figures", "figures", "--seeds", "0"]]


def test_help_shows_each_default():
    from cdist.cli import steps
    from cdist.cli.parser import Parser

    p = Parser(prog="cdist distill")
    steps._configure(p, "distill")
    text = " ".join(p.format_help().split())
    for shown in ("validation items (selection, matching and curves) (default: 500)",
                  "seed of every item set (default: 0)", "(default: runs/<task>, out of git)"):
        assert shown in text, shown
    assert "(default: None)" not in text and "(default: False)" not in text


def test_table_draw_only_redraws_the_figures_from_results_json_alone(tmp_path, capsys):
    """``cdist table --draw-only``: the committed Table 2's figures again from its results.json,
    named by the task that made it (not the default task), and nothing else written anywhere."""
    results = Path(__file__).resolve().parents[1] / "results" / "theory_of_mind" / "results.json"
    out, figures = tmp_path / "run", tmp_path / "figures"
    out.mkdir()
    (out / "results.json").write_bytes(results.read_bytes())
    assert cli.main(["table", "--out", str(out), "--figures", str(figures), "--draw-only"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]
    names = {p.name for p in figures.iterdir()}
    for view in ("val-ce", "val-accuracy", "head-map", "head-map-links"):
        assert {f"table2-theory-of-mind-{view}.html", f"table2-theory-of-mind-{view}.png"} <= names
    assert "plotly.min.js" in names and not any(n.endswith((".md", ".csv", ".json")) for n in names)
    assert "8 figure files" in capsys.readouterr().out
    assert cli.main(["table", "--out", str(tmp_path / "none"), "--draw-only"]) == 2
    assert "results.json is missing" in capsys.readouterr().err


@pytest.mark.parametrize("flags, expected", [
    (["--ood-templates", "mixed", "then"],
     (("template mixed", {"template": "mixed"}), ("template then", {"template": "then"}))),
    ([], ()),
    (["--ood-boxes", "8"], "--ood-boxes: ioi has no boxes"),
    (["--ood-templates", "prakash"], "--ood-templates prakash: ioi has templates"),
])
def test_ood_sets_of_a_task_with_no_default_ones_are_taken_or_refused(flags, expected):
    """IOI has no default OOD sets; ``--ood-templates`` was dropped silently there (a table ran
    with no OOD set), and a kind or value the task lacks must be refused in one line."""
    from cdist.cli import common, settings, steps
    from cdist.cli.flags import UsageError
    from cdist.cli.parser import Parser

    parser = Parser(prog="cdist discover")
    steps._configure(parser, "discover")
    argv = ["--task", "ioi", "--teacher", "t.gguf", "--student", "s", "--out", "o", *flags]
    s = settings.parse(parser, argv, "discover")
    if isinstance(expected, str):
        with pytest.raises(UsageError, match=expected):
            common.experiment_config(s)
    else:
        assert common.experiment_config(s).ood == expected
