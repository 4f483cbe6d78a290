"""The discovery scans split over two ranks (torchrun, gloo on the CPU) give what one process gives.

``tests/torchrun_scans.py`` runs mean ablation, activation and path patching and a short
entity-tracking search (written to a checkpoint folder, then resumed from it) on each of two ranks,
recording the heads each rank intervened on; the same scans run here in one process. Every rank
must return the single process's scans, while running only its own share of the heads.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from torchrun_scans import build, run_scans

pytestmark = pytest.mark.slow  # two processes start (about 20 to 40 s on 2 busy cores)

TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent))
WORKER = Path(__file__).with_name("torchrun_scans.py")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Each rank's ``run_scans`` result, in rank order, from a torchrun launch of two processes."""
    if TORCHRUN is None:
        pytest.skip(f"no torchrun beside {sys.executable} (it comes with torch)")
    tmp = tmp_path_factory.mktemp("torchrun")
    out, checkpoints = tmp / "ranks.pt", tmp / "search"
    env = os.environ | {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [TORCHRUN, "--standalone", "--nproc-per-node", "2", str(WORKER), str(out),
           str(checkpoints)]
    torchrun = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    try:
        log, _ = torchrun.communicate(timeout=300)  # the workers stop themselves after 90 s
    except subprocess.TimeoutExpired:
        # SIGTERM, which torchrun passes on to its workers (they run in sessions of their own,
        # so a SIGKILL of torchrun would leave them behind)
        torchrun.terminate()
        log, _ = torchrun.communicate(timeout=60)
    assert torchrun.returncode == 0, log[-6000:]
    everyone = torch.load(out, weights_only=False)
    assert [r["rank"] for r in everyone] == [0, 1]
    assert sorted(p.name for p in checkpoints.iterdir()) == sorted(set(everyone[0]["writes"]))
    return everyone


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    model, data = build()
    # one thread, as each rank runs: sums then split alike, and scores agree to float32 rounding
    # however the machine's kernels add (with two threads here, AVX2 kernels put relative changes
    # near 0.8 3e-6 apart)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_scans(model, data, tmp_path_factory.mktemp("single"))
    finally:
        torch.set_num_threads(threads)


def test_every_rank_returns_the_single_process_scans(ranks, single):
    assert single["scans"]["path_patching"]["relative_change"].abs().max() > 1e-3  # measured
    assert len(single["circuits"][0]["groups"]["value_fetcher"]) == 2
    for rank in ranks:
        assert rank["scans"].keys() == single["scans"].keys()
        for name, metrics in single["scans"].items():
            for metric, expected in metrics.items():
                torch.testing.assert_close(rank["scans"][name][metric], expected, atol=1e-6,
                                           rtol=1e-6, equal_nan=True,
                                           msg=lambda m, n=name, k=metric: f"{n} {k}: {m}")
                # both ranks hold the same sums: the same scan, bit for bit
                torch.testing.assert_close(rank["scans"][name][metric],
                                           ranks[0]["scans"][name][metric], atol=0, rtol=0,
                                           equal_nan=True)
        # the search and its resumption reach the same groups
        assert rank["circuits"] == single["circuits"]
        for name in ("mean_ablation", "path_patching"):
            # a killed scan's running sums, each rank its own
            assert rank["resumed_from_disk"][f"{name}_resumed"], name
            # killed in its second batch and resumed: every batch ran once, as in one scan
            assert rank["ran"][f"{name}_resumed"] == rank["ran"][name]
            for metric, value in rank["scans"][f"{name}_resumed"].items():
                assert torch.equal(value.nan_to_num(), rank["scans"][name][metric].nan_to_num())
    assert single["circuits"][1] == single["circuits"][0]
    for name in ("mean_ablation", "path_patching"):
        assert single["resumed_from_disk"][f"{name}_resumed"], name
        assert single["ran"][f"{name}_resumed"] == single["ran"][name]


def test_each_rank_runs_only_its_share_of_the_heads(ranks, single):
    for name, everything in single["ran"].items():
        first, second = (Counter(rank["ran"][name]) for rank in ranks)
        assert not first.keys() & second.keys(), name  # no head on both ranks
        assert first + second == Counter(everything), name  # every head (and batch) once
        if len(set(everything)) > 1:  # a share for each, in turn (layer by layer)
            assert first and second, name
    assert ranks[0]["ran"]["mean_ablation"] == [h for h in single["ran"]["mean_ablation"]
                                                if h % 2 == 0]
    assert ranks[1]["ran"]["path_patching_one"] == []  # one sender: the second rank has none
    assert all(not rank["ran"]["resumed"] for rank in ranks)  # read from the checkpoints


def test_only_the_first_rank_writes_the_search_checkpoints(ranks, single):
    assert ranks[0]["writes"] == single["writes"] == ["value_fetcher.json",
                                                      "position_transmitter.json"]
    assert ranks[1]["writes"] == []
