"""experiments/bench_scale.py runs end to end on the CPU at tiny shapes and records every
measurement with values that hold together."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "bench_scale.py"
RUNS = ("distill_ce", "distill_ce_cka", "distill_full_ce_cka", "distill_cached_ce_cka")


@pytest.mark.slow
def test_bench_scale_records_every_measurement(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(SCRIPT), "--teacher", "tiny", "--student", "tiny", "--prompts", "4",
           "--check-prompts", "4", "--n-boxes", "3", "--steps", "2", "--batch-size", "4",
           "--scan-batch-size", "4", "--train-share", "0.25", "--threads", "2", "--out", str(out)]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = json.loads(out.read_text())
    assert saved["device"].startswith("CPU") and saved["commit"] and saved["torch"]
    assert saved["config"]["dtype"] == "float32" and saved["config"]["steps"] == 2
    r = saved["results"]
    printed = done.stdout

    # the scans: timed, and the bfloat16 twins measured a real, small difference
    assert r["ablation_scan"]["seconds"] > 0 and r["ablation_scan"]["heads"] == 12
    assert r["ablation_scan"]["prompts"] == 4 and r["ablation_scan"]["means_seconds"] > 0
    search = r["path_patching_search"]
    assert search["seconds"] > 0 and search["prompts"] == 4
    assert set(search["groups"]) == {"value_fetcher", "position_transmitter",
                                     "position_detector", "structure_reader"}
    assert search["senders"]["value_fetcher"] == 12  # into the logits, every head is a sender
    assert len(search["groups"]["value_fetcher"]) == 2  # k heads, whatever their effect
    for name in ("ablation_bf16_vs_fp32", "path_patching_bf16_vs_fp32"):
        check = r[name]
        assert math.isfinite(check["max_abs_diff"]) and check["prompts"] == 4
        assert 0 < check["max_abs_diff"] < 0.25 * check["max_abs_fp32"], check
    assert "full ablation scan: 12 heads x 4 prompts" in printed
    assert "bfloat16 vs float32" in printed and "path-patching search" in printed

    # distillation: a step's time from its timed steps, AdamW's two moments per trained weight
    tokens = r["distill"]["tokens_per_step"]
    assert tokens > 4 * 10  # 4 prompts of more than 10 tokens
    for run in (r[name] for name in RUNS):
        assert len(run["step_times_s"]) == 2 and all(t > 0 for t in run["step_times_s"])
        assert min(run["step_times_s"]) <= run["step_s"] <= max(run["step_times_s"])
        assert run["tokens_per_s"] == pytest.approx(tokens / run["step_s"])
        assert run["optimizer_state_elements"] == 2 * run["trained_params"]
        assert run["optimizer_state_bytes"] >= 4 * run["optimizer_state_elements"]
        assert run["moment_dtype"] == "float32"
        assert run["peak_gib"] is None and run["resident_gib"] is None  # no GPU
    ce, cka, full, cached = (r[name] for name in RUNS)
    assert cached["trained_params"] == cka["trained_params"]  # the same run, from the cache
    assert r["distill"]["cache_build_s"] > 0
    assert r["distill"]["cached_over_live"] == pytest.approx(cached["step_s"] / cka["step_s"])
    assert ce["trained_params"] == cka["trained_params"] < full["trained_params"]
    assert 0 < cka["param_share"] < 0.01 and 0.9 < full["param_share"] < 1
    summary = r["distill"]
    assert summary["trained_heads"] == 3  # a quarter of 12
    assert summary["cka_over_ce"] == pytest.approx(cka["step_s"] / ce["step_s"])
    assert summary["param_ratio"] == pytest.approx(cka["trained_params"] / full["trained_params"])
    assert summary["state_ratio"] == pytest.approx(summary["param_ratio"], rel=1e-12)
    assert summary["state_bytes_ratio"] == pytest.approx(summary["param_ratio"], rel=0.01)
    assert summary["peak_ratio"] is None
    assert printed.count("distill step, ") == 4 and "target <= 1.10x" in printed
    assert "teacher cache: built in" in printed


def test_cast_changes_weights_buffers_and_config_and_is_exact_back_from_bfloat16():
    import torch

    from cdist.models import cast, new_llama

    model = new_llama(n_layers=1, d_model=16, n_heads=2, n_kv_heads=1, d_mlp=32, vocab_size=11)
    assert cast(model, torch.bfloat16) is model and model.cfg.dtype == torch.bfloat16
    assert {t.dtype for t in [*model.parameters(), model.blocks[0].attn.rotary_sin]} \
        == {torch.bfloat16}
    low = {name: p.clone() for name, p in model.named_parameters()}
    cast(model, torch.float32)
    assert model.cfg.dtype == torch.float32
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, low[name].float()), name


@pytest.mark.parametrize("script", ["bench_scale.py", "bench_discovery.py"])
def test_benchmarks_refuse_a_device_this_machine_lacks_in_one_line(tmp_path, script):
    done = subprocess.run([sys.executable, str(SCRIPT.parent / script), "--device", "cuda:99"],
                          cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{script}: error: device 'cuda:99' is not on this machine; it has cpu")
