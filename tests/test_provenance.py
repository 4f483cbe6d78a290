"""cdist.provenance: what a benchmark records about its machine and its wall times."""

import time

import torch

from cdist.provenance import device_name, git_commit, timed


def test_timed_returns_the_result_and_the_fastest_of_its_calls():
    durations = iter([0.5, 0.05, 0.3])
    calls = []

    def fn():
        calls.append(1)
        time.sleep(next(durations))
        return "result"

    result, seconds = timed(fn, "cpu", repeats=3)
    assert result == "result" and len(calls) == 3
    assert 0.05 <= seconds < 0.3  # the 0.05 s call, not the others or their sum


def test_device_name_says_how_many_threads_a_cpu_run_used():
    assert device_name("cpu") == f"CPU ({torch.get_num_threads()} threads)"
    assert device_name(torch.device("cpu")) == device_name("cpu")


def test_git_commit_is_a_sha_in_this_checkout():
    sha = git_commit().removesuffix("+dirty")
    assert sha == "unknown" or (len(sha) == 40 and int(sha, 16) >= 0)
