"""cdist.provenance: what a benchmark records about its machine and its wall times."""

import subprocess

import pytest
import torch

from cdist import provenance
from cdist.provenance import device_name, git_commit, timed


def test_timed_returns_the_result_and_the_fastest_of_its_calls(monkeypatch):
    # a fake clock: each call takes the time its entry says, so no wall-clock window is asserted
    durations = iter([0.5, 0.05, 0.3])
    now = [100.0]
    calls = []

    def clock():
        return now[0]

    def fn():
        calls.append(1)
        now[0] += next(durations)
        return "result"

    monkeypatch.setattr(provenance.time, "perf_counter", clock)
    result, seconds = timed(fn, "cpu", repeats=3)
    assert result == "result" and len(calls) == 3
    assert seconds == pytest.approx(0.05)  # the fastest call, not the others or their sum


def test_device_name_says_how_many_threads_a_cpu_run_used():
    assert device_name("cpu") == f"CPU ({torch.get_num_threads()} threads)"
    assert device_name(torch.device("cpu")) == device_name("cpu")


def test_git_commit_is_head_in_this_checkout_and_unknown_outside_one(monkeypatch, tmp_path):
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=provenance.REPO, capture_output=True,
                          text=True, check=True).stdout.strip()
    assert git_commit().removesuffix("+dirty") == head and len(head) == 40
    monkeypatch.setattr(provenance, "REPO", tmp_path)  # not a git checkout
    assert git_commit() == "unknown"


def test_git_commit_is_dirty_for_changed_code_not_for_changed_results(monkeypatch, tmp_path):
    def git(*args):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              cwd=tmp_path, capture_output=True, text=True, check=True).stdout

    git("init", "-q")
    (tmp_path / "results").mkdir()
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "results" / "run.json").write_text("{}\n")
    git("add", "-A")
    git("commit", "-qm", "first")
    head = git("rev-parse", "HEAD").strip()
    monkeypatch.setattr(provenance, "REPO", tmp_path)
    assert git_commit() == head
    (tmp_path / "results" / "run.json").write_text('{"rewritten": true}\n')
    (tmp_path / "results" / "new.json").write_text("{}\n")
    assert git_commit() == head  # a run's own records
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_commit() == head + "+dirty"
