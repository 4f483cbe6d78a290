"""The Table 1-2 pipeline end to end on tiny random Llama checkpoint directories (the real-Llama code path)."""

from __future__ import annotations

import json

import pytest

from cdist import experiment
from cdist.models import new_llama, save_llama


@pytest.mark.slow
def test_experiment_runs_on_checkpoint_directories(tok, tmp_path):
    dirs = {}
    for role, (layers, width, heads, seed) in {"teacher": (3, 64, 4, 0), "student": (2, 32, 8, 1)}.items():
        model = new_llama(n_layers=layers, d_model=width, n_heads=heads, n_kv_heads=2, d_mlp=2 * width,
                          vocab_size=len(tok), seed=seed, tokenizer=tok)
        dirs[role] = save_llama(model, tmp_path / role, tokenizer=tok)
    figures = tmp_path / "figures"
    argv = ["--teacher", str(dirs["teacher"]), "--student", str(dirs["student"]), "--seeds", "0", "1",
            "--steps", "4", "--lambdas", "0.5", "2.0", "--train-items", "64", "--val-items", "24", "--test-items",
            "40", "--min-effect", "0", "--out", str(tmp_path / "out"), "--figures", str(figures),
            "--device", "cpu"]
    summary = experiment.main("entity_tracking", argv)
    assert list(summary["rows"]) == list(experiment.ROWS)
    for row in summary["rows"].values():
        assert [r["seed"] for r in row["runs"]] == [0, 1]
        assert 0.0 <= row["full_accuracy"]["mean"] <= 1.0
    assert summary["lambda"] in (0.5, 2.0) and len(summary["lambda_sweep"]) == 2
    assert set(summary["mcnemar"]) == {"circuit distilled, CE + Align CKA vs circuit distilled, CE",
                                       "circuit distilled, CE + Align CKA vs fully distilled, CE"}
    assert summary["config"]["task_kwargs"]["template"] == "prakash"
    # the teacher's circuit by path patching, the student's by the mean-ablation ranking (within 20% of heads)
    methods = {role: json.loads((tmp_path / "out" / f"circuit-{role}.json").read_text())["method"]
               for role in ("teacher", "student")}
    assert methods == {"teacher": "path_patching", "student": "mean_ablation"}
    assert 1 <= sum(len(g) for g in summary["circuits"]["student"]["groups"].values()) <= 3  # 20% of 16
    table = (figures / "table1-entity-tracking.md").read_text()
    assert "| circuit distilled, CE + Align CKA |" in table and "McNemar" in table
    saved = json.loads((figures / "table1-entity-tracking.json").read_text())
    assert saved["commit"] and saved["command"].endswith("--device cpu")
    assert (figures / "table1-entity-tracking.csv").read_text().startswith("row,full_accuracy_mean")
    assert (figures / "table1-entity-tracking-ce.html").exists()
    assert (figures / "table1-entity-tracking-head-map.html").exists()
    # a second call reuses every finished distillation run and gives the same table
    again = experiment.main("entity_tracking", argv)
    assert again["rows"] == summary["rows"]


def test_a_stale_run_folder_is_a_one_line_error(tok, tmp_path, capsys):
    """Distillation runs of another student left in --out stop the script with one line (after the progress
    bars), not a traceback."""
    dirs = {}
    for role, seed in (("teacher", 0), ("student", 1), ("other", 2)):
        model = new_llama(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_mlp=64, vocab_size=len(tok), seed=seed,
                          tokenizer=tok)
        dirs[role] = save_llama(model, tmp_path / role, tokenizer=tok)
    argv = ["--teacher", str(dirs["teacher"]), "--seeds", "0", "--steps", "2", "--lambdas", "0.5", "--train-items",
            "32", "--val-items", "16", "--test-items", "16", "--min-effect", "0", "--out", str(tmp_path / "out"),
            "--figures", str(tmp_path / "figures"), "--device", "cpu", "--rows", "circuit distilled, CE"]
    experiment.main("entity_tracking", ["--student", str(dirs["student"]), *argv])
    with pytest.raises(SystemExit) as stop:
        experiment.main("entity_tracking", ["--student", str(dirs["other"]), *argv])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in err
    assert "another student, teacher or head set" in err.strip().splitlines()[-1]
    with pytest.raises(SystemExit):
        experiment.main("entity_tracking", ["--student", str(dirs["student"]), *argv, "--cka-position", "pos_nowhere"])
    assert "is not a position of this task's items" in capsys.readouterr().err.strip().splitlines()[-1]
