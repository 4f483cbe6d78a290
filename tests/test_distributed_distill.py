"""Data-parallel distillation under torchrun (gloo, 2 CPU processes) is one process's distillation
on the same global batches: the same loss, terms and gradients (to 1e-5), the same trained weights
and logged metrics, with the teacher live or cached."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).parent / "torchrun_distill.py"
TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which(
    "torchrun")
pytestmark = pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed")


def launch(out: Path, *extra: str, processes: int = 2) -> None:
    out.mkdir()
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    if processes == 1:  # the reference: a plain process, no process group at all
        command = [sys.executable, str(WORKER), str(out), *extra]
    else:
        command = [TORCHRUN, "--standalone", f"--nproc-per-node={processes}", str(WORKER),
                   str(out), *extra]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("cached", [False, True])
def test_two_processes_train_as_one_on_the_global_batch(tmp_path, cached):
    extra = ("--cache", str(tmp_path / "cache")) if cached else ()
    launch(tmp_path / "one", *extra, processes=1)
    launch(tmp_path / "two", *extra)
    one = torch.load(tmp_path / "one" / "first-rank0.pt")
    ranks = [torch.load(tmp_path / "two" / f"first-rank{r}.pt") for r in (0, 1)]
    assert one["rows"] == [8] and [r["rows"] for r in ranks] == [[4], [4]]  # the batch was split
    for rank in ranks:
        for key in ("loss", "ce", "kd", "cka"):
            torch.testing.assert_close(rank[key], one[key], rtol=1e-5, atol=1e-5)
        assert len(rank["grads"]) == len(one["grads"]) and any(g.abs().sum() > 0
                                                               for g in one["grads"])
        for got, want in zip(rank["grads"], one["grads"], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    run_one = torch.load(tmp_path / "one" / "run.pt")
    run_two = torch.load(tmp_path / "two" / "run.pt")
    for name, value in run_one["weights"].items():
        torch.testing.assert_close(run_two["weights"][name], value, rtol=1e-5, atol=1e-5)
    for a, b in zip(run_one["metrics"], run_two["metrics"], strict=True):
        for key in ("loss", "ce", "kd", "cka_mean", "accuracy", "val_ce", "grad_ce", "grad_cka"):
            if a.get(key) is not None:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-5), key
    # rank 0 alone wrote the run folder, and the second rank left nothing behind
    assert (tmp_path / "two" / "run" / "metrics.json").is_file()
    assert not list((tmp_path / "two").rglob("*.tmp"))


@pytest.mark.slow
def test_the_distill_command_runs_under_torchrun(tok, tmp_path):
    """``torchrun -m cdist.cli distill`` trains the run one process would, and writes its folder
    once."""
    from cdist import cli
    from cdist.models import new_llama, save_llama

    models = []
    for role, seed in (("teacher", 0), ("student", 1)):
        model = new_llama(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_mlp=64,
                          vocab_size=len(tok), seed=seed, tokenizer=tok)
        models += [f"--{role}", str(save_llama(model, tmp_path / role, tokenizer=tok))]
    small = ["--n-boxes", "3", "--val-items", "16", "--test-items", "16", "--ood-items", "8",
             "--reference-items", "16", "--discovery-items", "16", "--ood-boxes", "3",
             "--n-random", "1", "--min-effect", "0", "--min-faithfulness", "0", "--device", "cpu"]
    cli.run(["discover", *models, *small, "--out", str(tmp_path / "one")])
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    step = ["distill", "--steps", "2", "--eval-every", "1", "--batch-size", "8", "--train-items",
            "16", "--lr", "1e-3", "--lam", "0.5"]
    cli.run([*step, "--out", str(tmp_path / "one")])
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run([TORCHRUN, "--standalone", "--nproc-per-node=2", "-m", "cdist.cli",
                           *step, "--out", str(tmp_path / "two")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("test accuracy full") == 1  # rank 0 speaks for both
    run = Path("runs/n16/circuit_distilled-CE+Align_CKA-seed0")
    one, two = (json.loads((tmp_path / d / run / "metrics.json").read_text())["metrics"]
                for d in ("one", "two"))
    for a, b in zip(one, two, strict=True):
        for key in ("loss", "ce", "cka_mean", "accuracy", "val_ce"):
            if a.get(key) is not None:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-5), key
    assert [json.loads((tmp_path / d / run / "eval.json").read_text())["full_accuracy"]
            for d in ("one", "two")] == [json.loads((tmp_path / "one" / run / "eval.json")
                                                    .read_text())["full_accuracy"]] * 2
    log = (tmp_path / "two" / "commands.log").read_text().splitlines()
    assert len(log) == 2  # discover, then distill once (not once a rank)
