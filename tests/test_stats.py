"""Statistics of paired accuracies with the run as the unit (``cdist.stats``) and power for
planning (``cdist.power``): each against an independent reference (scipy, statsmodels, a plain
loop, a simulation), plus the edge cases a small table meets; and the re-analysis script."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cdist import power, stats
from cdist.errors import InputError

scipy_stats = pytest.importorskip("scipy.stats")
weightstats = pytest.importorskip("statsmodels.stats.weightstats")


def _accuracies(gen: torch.Generator, n: int) -> tuple[list[float], list[float]]:
    base = 0.5 + 0.2 * torch.rand(n, generator=gen, dtype=torch.float64)
    shift = 0.03 * torch.randn(1, generator=gen, dtype=torch.float64)
    noise = 0.02 * torch.randn(n, generator=gen, dtype=torch.float64)
    return (base + shift + noise).tolist(), base.tolist()


# ---- seed_difference ---------------------------------------------------------------------------

@pytest.mark.parametrize("case", range(30))
def test_seed_difference_matches_scipy_and_statsmodels(case):
    gen = torch.Generator().manual_seed(case)
    n = 2 + case % 9
    alpha, margin = (0.05, 0.1, 0.01)[case % 3], (0.02, 0.05, 0.01)[case % 3]
    a, b = _accuracies(gen, n)
    ours = stats.seed_difference(a, b, margin=margin, alpha=alpha)
    rel = scipy_stats.ttest_rel(a, b)
    one = scipy_stats.ttest_1samp(np.subtract(a, b), 0.0)
    assert ours["p_value"] == pytest.approx(rel.pvalue, rel=1e-9)
    assert ours["p_value"] == pytest.approx(one.pvalue, rel=1e-9)
    low, high = rel.confidence_interval(1 - alpha)
    assert ours["ci"] == pytest.approx((low, high), rel=1e-9, abs=1e-12)
    assert ours["sd"] == pytest.approx(np.std(np.subtract(a, b), ddof=1), rel=1e-9)
    assert ours["se"] == pytest.approx(ours["sd"] / math.sqrt(n), rel=1e-12)
    tost_p, _, _ = weightstats.ttost_paired(np.array(a), np.array(b), -margin, margin)
    assert ours["tost_p"] == pytest.approx(tost_p, rel=1e-9, abs=1e-15)
    assert ours["equivalent"] == (tost_p < alpha) and ours["note"] is None
    excludes = low > 0 or high < 0
    want = ({(True, True): "different but within margin", (False, True): "equivalent",
             (False, False): "inconclusive"}.get((excludes, ours["equivalent"]))
            or ("better" if low > 0 else "worse"))
    assert ours["verdict"] == want


@pytest.mark.parametrize(("diffs", "margin", "verdict"), [
    ([0.05, 0.06, 0.055, 0.052, 0.058], 0.02, "better"),
    ([-0.05, -0.06, -0.055, -0.052, -0.058], 0.02, "worse"),
    ([0.001, -0.002, 0.0015, -0.001, 0.0005], 0.02, "equivalent"),
    ([0.010, 0.011, 0.0105, 0.0102, 0.0108], 0.05, "different but within margin"),
    ([0.04, -0.03], 0.02, "inconclusive"),
])
def test_seed_difference_verdicts(diffs, margin, verdict):
    ours = stats.seed_difference([0.6 + d for d in diffs], [0.6] * len(diffs), margin=margin)
    assert ours["verdict"] == verdict and ours["verdict"] in stats.VERDICTS


def test_seed_difference_with_one_seed_or_no_spread_says_so():
    one = stats.seed_difference([0.7], [0.6], margin=0.02)
    assert one["n_seeds"] == 1 and one["mean"] == pytest.approx(0.1)
    assert all(math.isnan(x) for x in (one["sd"], one["p_value"], one["tost_p"], *one["ci"]))
    assert one["verdict"] == "inconclusive" and "one seed" in one["note"]
    flat = stats.seed_difference([0.7, 0.8, 0.65], [0.6, 0.7, 0.55], margin=0.02)
    assert flat["sd"] == 0.0 and math.isnan(flat["p_value"]) and "sd = 0" in flat["note"]
    assert flat["verdict"] == "inconclusive" and not flat["equivalent"]


def test_seed_difference_refuses_what_it_cannot_pair():
    with pytest.raises(InputError, match="one accuracy per seed"):
        stats.seed_difference([0.1, 0.2], [0.1], margin=0.02)
    with pytest.raises(InputError, match="margin"):
        stats.seed_difference([0.1, 0.2], [0.1, 0.3], margin=0.0)
    with pytest.raises(InputError, match="alpha"):
        stats.seed_difference([0.1, 0.2], [0.1, 0.3], margin=0.02, alpha=1.5)
    with pytest.raises(InputError, match="not finite"):
        stats.seed_difference([0.1, math.nan], [0.1, 0.3], margin=0.02)


# ---- clustered McNemar -------------------------------------------------------------------------

def _clustered_reference(xa: list[torch.Tensor], xb: list[torch.Tensor]) -> dict:
    """Durkalski et al.'s statistic by plain loops over items and seeds."""
    items = len(xa[0])
    b_i = [sum(bool(x[i]) and not bool(y[i]) for x, y in zip(xa, xb, strict=True))
           for i in range(items)]
    c_i = [sum(bool(y[i]) and not bool(x[i]) for x, y in zip(xa, xb, strict=True))
           for i in range(items)]
    spread = sum((b - c) ** 2 for b, c in zip(b_i, c_i, strict=True))
    b, c = sum(b_i), sum(c_i)
    x = (b - c) ** 2 / spread if spread else 0.0
    return {"b": b, "c": c, "statistic": x,
            "p_value": scipy_stats.chi2.sf(x, 1) if spread else 1.0, "n_items": items,
            "n_informative_items": sum(bi + ci > 0 for bi, ci in zip(b_i, c_i, strict=True)),
            "design_effect": spread / (b + c) if b + c else math.nan}


def _bits(gen: torch.Generator, seeds: int, items: int, p: float) -> list[torch.Tensor]:
    return list(torch.rand(seeds, items, generator=gen) < p)


@pytest.mark.parametrize("case", range(20))
def test_clustered_mcnemar_matches_its_loop_twin(case):
    gen = torch.Generator().manual_seed(100 + case)
    seeds, items = 1 + case % 6, 5 + 13 * case
    shared = torch.rand(items, generator=gen) < 0.6  # items correlate across seeds and arms
    xa = [x | shared for x in _bits(gen, seeds, items, 0.3)]
    xb = [x | shared for x in _bits(gen, seeds, items, 0.25)]
    ours, want = stats.clustered_mcnemar(xa, xb), _clustered_reference(xa, xb)
    assert ours.keys() == want.keys()
    for key, value in want.items():
        if isinstance(value, float) and math.isnan(value):
            assert math.isnan(ours[key])
        else:
            assert ours[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key


@pytest.mark.parametrize("case", range(10))
def test_clustered_mcnemar_with_one_seed_is_mcnemar_without_correction(case):
    from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar

    gen = torch.Generator().manual_seed(200 + case)
    a, b = _bits(gen, 1, 40 + 10 * case, 0.6)[0], _bits(gen, 1, 40 + 10 * case, 0.5)[0]
    table = [[int((a & b).sum()), int((a & ~b).sum())], [int((~a & b).sum()), int((~a & ~b).sum())]]
    theirs = sm_mcnemar(table, exact=False, correction=False)
    ours = stats.clustered_mcnemar([a], [b])
    assert ours["statistic"] == pytest.approx(float(theirs.statistic), rel=1e-12)
    assert ours["p_value"] == pytest.approx(float(theirs.pvalue), rel=1e-9)
    assert ours["design_effect"] == pytest.approx(1.0)


def test_clustered_mcnemar_with_nothing_discordant():
    x = [torch.tensor([True, False, True])] * 3
    ours = stats.clustered_mcnemar(x, x)
    assert (ours["b"], ours["c"], ours["statistic"], ours["p_value"]) == (0, 0, 0.0, 1.0)
    assert ours["n_informative_items"] == 0 and math.isnan(ours["design_effect"])
    # discordances that cancel within every item: no evidence either way
    a, b = [torch.tensor([True, False]), torch.tensor([False, True])], \
        [torch.tensor([False, True]), torch.tensor([True, False])]
    ours = stats.clustered_mcnemar(a, b)
    assert (ours["b"], ours["c"], ours["p_value"]) == (2, 2, 1.0)


def test_clustered_mcnemar_refuses_unpaired_runs():
    with pytest.raises(InputError, match="same seeds"):
        stats.clustered_mcnemar([torch.ones(3, dtype=torch.bool)], [])
    with pytest.raises(InputError, match="same items"):
        stats.clustered_mcnemar([torch.ones(3, dtype=torch.bool)] * 2,
                                [torch.ones(3, dtype=torch.bool), torch.ones(4, dtype=torch.bool)])


def test_copied_discordances_fool_the_pooled_test_but_not_the_clustered_one():
    """One seed's results copied to k seeds carry no new evidence: the pooled (CMH) p-value falls
    with k, the clustered one stays put and its design effect is k."""
    for case in range(5):
        gen = torch.Generator().manual_seed(300 + case)
        a = _bits(gen, 1, 200, 0.6)[0]
        b, order = a.clone(), torch.randperm(200, generator=gen)
        wins, losses = 10 + case, 5 + case // 2  # A right and B wrong, and the reverse
        a[order[:wins]], b[order[:wins]] = True, False
        a[order[wins:wins + losses]], b[order[wins:wins + losses]] = False, True
        pooled, clustered = [], []
        for k in range(1, 6):
            pooled.append(stats.mcnemar_pooled([a] * k, [b] * k)["p_value"])
            one = stats.clustered_mcnemar([a] * k, [b] * k)
            clustered.append(one["p_value"])
            assert one["design_effect"] == pytest.approx(k)
        assert all(p > q for p, q in zip(pooled, pooled[1:], strict=False))
        assert pooled[-1] < pooled[0] / 2
        assert clustered == pytest.approx([clustered[0]] * 5, rel=1e-12)


def test_under_the_null_with_shared_items_only_the_clustered_test_holds_its_level():
    """Items that lean one way in every seed (no difference on average): the pooled test rejects
    far more often than alpha, the clustered test about alpha of the time."""
    gen = torch.Generator().manual_seed(7)
    rejected = {"pooled": 0, "clustered": 0}
    trials, seeds, items = 300, 5, 100
    for _ in range(trials):
        prone = torch.rand(items, generator=gen) < 0.3  # items the arms disagree on
        a_wins = torch.rand(items, generator=gen) < 0.5  # which arm each one favours
        agree = torch.rand(seeds, items, generator=gen) < 0.8  # in most seeds
        base = torch.rand(seeds, items, generator=gen) < 0.5
        split = prone & agree
        xa, xb = torch.where(split, a_wins, base), torch.where(split, ~a_wins, base)
        rejected["pooled"] += stats.mcnemar_pooled(list(xa), list(xb))["p_value_chi2"] < 0.05
        rejected["clustered"] += stats.clustered_mcnemar(list(xa), list(xb))["p_value"] < 0.05
    assert rejected["pooled"] / trials > 0.3
    assert rejected["clustered"] / trials < 0.1


# ---- Holm --------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", range(15))
def test_holm_matches_statsmodels(case):
    from statsmodels.stats.multitest import multipletests

    gen = torch.Generator().manual_seed(400 + case)
    p = (torch.rand(1 + case, generator=gen, dtype=torch.float64) ** 3).tolist()
    if case % 3 == 0:
        p = p + p[:2]  # ties
    _, want, _, _ = multipletests(p, method="holm")
    assert stats.holm(p) == pytest.approx(list(want), rel=1e-12)


def test_holm_edges():
    assert stats.holm([]) == [] and stats.holm([0.03]) == [0.03]
    with pytest.raises(InputError, match="p-values"):
        stats.holm([0.1, math.nan])


# ---- compare -----------------------------------------------------------------------------------

def test_compare_holds_every_reading_of_the_same_bits():
    gen = torch.Generator().manual_seed(9)
    xa, xb = _bits(gen, 4, 150, 0.6), _bits(gen, 4, 150, 0.5)
    rec = stats.compare(xa, xb, margin=0.02)
    acc_a = [float(x.double().mean()) for x in xa]
    acc_b = [float(x.double().mean()) for x in xb]
    assert rec["accuracy_a"] == pytest.approx(acc_a) and rec["accuracy_b"] == pytest.approx(acc_b)
    assert rec["seed_level"] == stats.seed_difference(rec["accuracy_a"], rec["accuracy_b"],
                                                      margin=0.02)
    assert rec["clustered"] == stats.clustered_mcnemar(xa, xb)
    assert {k: v for k, v in rec["pooled_cmh"].items() if k != "note"} == \
        stats.mcnemar_pooled(xa, xb)
    assert "not for the primary reading" in rec["pooled_cmh"]["note"]
    assert rec["per_seed"] == [stats.mcnemar(x, y) for x, y in zip(xa, xb, strict=True)]
    assert rec["discordance"] == pytest.approx(
        sum(float((x ^ y).double().mean()) for x, y in zip(xa, xb, strict=True)) / 4)
    assert (rec["n_seeds"], rec["n_items"]) == (4, 150)


# ---- power -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("effect", "sd", "n", "alpha"), [
    (0.03, 0.02, 3, 0.05), (0.03, 0.02, 5, 0.05), (0.01, 0.02, 10, 0.05), (-0.02, 0.03, 8, 0.1),
    (0.05, 0.01, 2, 0.01), (0.002, 0.02, 40, 0.05)])
def test_paired_t_power_matches_statsmodels(effect, sd, n, alpha):
    from statsmodels.stats.power import TTestPower

    want = TTestPower().power(effect_size=effect / sd, nobs=n, alpha=alpha)
    assert power.paired_t_power(effect, sd, n, alpha) == pytest.approx(float(want), rel=1e-7)


def test_paired_t_power_edges_and_seeds_for_power():
    assert power.paired_t_power(0.0, 0.02, 5) == pytest.approx(0.05)
    for effect, sd in ((0.03, 0.02), (0.01, 0.02), (0.05, 0.01)):
        n = power.seeds_for_power(effect, sd)
        assert power.paired_t_power(effect, sd, n) >= 0.8
        assert n == 2 or power.paired_t_power(effect, sd, n - 1) < 0.8
    with pytest.raises(InputError, match="n >= 2"):
        power.paired_t_power(0.03, 0.02, 1)
    with pytest.raises(InputError, match="do not reach"):
        power.seeds_for_power(0.0, 0.02, max_n=20)


def test_variance_model_and_design_power_by_simulation():
    """Runs whose true difference is N(delta, run_var) and whose items disagree with probability
    pi: the per-seed differences' variance is the model's, and the paired t-test rejects as often
    as design_power says."""
    gen = torch.Generator().manual_seed(11)
    delta, run_var, pi, m, n, experiments = 0.03, 0.02**2, 0.3, 200, 5, 2000
    run_effect = delta + math.sqrt(run_var) * torch.randn(experiments, n, 1, generator=gen,
                                                           dtype=torch.float64)
    disagree = torch.rand(experiments, n, m, generator=gen, dtype=torch.float64) < pi
    a_wins = torch.rand(experiments, n, m, generator=gen, dtype=torch.float64) \
        < (1 + run_effect / pi) / 2
    d = (disagree * (2.0 * a_wins - 1)).mean(-1)  # (experiments, seeds) measured differences
    model = run_var + (pi - delta**2) / m
    assert d.var().item() == pytest.approx(model, rel=0.05)
    t = d.mean(1) / (d.std(1) / math.sqrt(n))
    rate = float((2 * scipy_stats.t.sf(t.abs().numpy(), n - 1) < 0.05).mean())
    assert rate == pytest.approx(power.design_power(delta, run_var, pi, m, n), abs=0.04)
    pilot = power.run_variance(d.flatten().tolist(), pi, m)
    assert pilot["run_var"] == pytest.approx(run_var, rel=0.3) and not pilot["floored"]


def test_run_variance_floors_at_zero_and_says_so():
    rec = power.run_variance([0.01, 0.012, 0.011], discordance=0.2, n_items=100)
    assert rec["floored"] and rec["run_var"] == 0.0 and "floored" in rec["note"]
    assert rec["item_var"] == pytest.approx((0.2 - 0.011**2) / 100)
    with pytest.raises(InputError, match="discordance"):
        power.design_power(0.3, 0.0, 0.2, 100, 5)


def test_alternative_discordance_adds_the_effects_flips_to_the_pilots_churn():
    """Items that flip each way with probability churn / 2, and one way with probability delta
    more: the arms disagree on churn + delta of them, which is what the plan takes from a
    pilot that saw only the churn (and a small net difference)."""
    gen = torch.Generator().manual_seed(3)
    churn, delta, m = 0.011, 0.02, 400_000
    u = torch.rand(m, generator=gen, dtype=torch.float64)
    d = torch.where(u < churn / 2, 1.0, torch.where(u < churn, -1.0,
                                                    torch.where(u < churn + delta, 1.0, 0.0)))
    assert float((d != 0).double().mean()) == pytest.approx(
        power.alternative_discordance(churn, 0.0, delta), abs=5e-4)
    assert float(d.mean()) == pytest.approx(delta, abs=5e-4)
    # a pilot's net difference is not churn: the IOI pilot's 0.011 with +0.002 between the arms
    assert power.alternative_discordance(0.011, 0.002, 0.02) == pytest.approx(0.029)
    assert power.alternative_discordance(0.011, -0.002, -0.02) == pytest.approx(0.029)
    assert power.alternative_discordance(0.99, 0.0, 0.05) == 1.0
    # the variance model accepts what it gives where the pilot's own discordance is refused
    with pytest.raises(InputError, match="discordance"):
        power.design_power(0.02, 0.0, 0.011, 1000, 5)
    assert 0 < power.design_power(0.02, 0.0, power.alternative_discordance(0.011, 0.002, 0.02),
                                  1000, 5) < 1
    with pytest.raises(InputError, match="cannot exceed"):
        power.alternative_discordance(0.01, 0.02, 0.02)


def test_plan_more_items_never_need_more_seeds():
    rows = power.plan(0.03, 0.01**2, 0.25, [100, 300, 1000, 10_000], max_seeds=30)
    seeds = [r["n_seeds"] for r in rows]
    assert all(s is not None for s in seeds) and seeds == sorted(seeds, reverse=True)
    for r in rows:
        assert power.design_power(0.03, 0.01**2, 0.25, r["n_items"], r["n_seeds"]) >= 0.8
        assert r["n_seeds"] == 2 or power.design_power(0.03, 0.01**2, 0.25, r["n_items"],
                                                       r["n_seeds"] - 1) < 0.8
    hopeless = power.plan(0.001, 0.01**2, 0.25, [100], max_seeds=10)[0]
    assert hopeless["n_seeds"] is None and hopeless["power"] < 0.8


# ---- the re-analysis script --------------------------------------------------------------------

def _script():
    path = Path(__file__).resolve().parents[1] / "experiments" / "reanalyse.py"
    spec = importlib.util.spec_from_file_location("reanalyse", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reanalyse_writes_a_record_for_a_table(tmp_path, capsys):
    gen = torch.Generator().manual_seed(5)
    arms = ("circuit distilled, CE + Align CKA", "circuit distilled, CE",
            "circuit distilled, CE + Shuffled CKA")

    def word(n: int, p: float) -> str:
        return "".join("1" if x else "0" for x in (torch.rand(n, generator=gen) < p).tolist())

    runs = [{"arm": arm, "train_items": 16, "seed": seed, "test_full": word(60, 0.5 + 0.1 * i),
             "test_circuit": word(60, 0.5), "ood": {"3 boxes": word(30, 0.6)}}
            for i, arm in enumerate(arms) for seed in range(3)]
    (tmp_path / "per_item.json").write_text(json.dumps({"eval_sets": {"test": 60, "3 boxes": 30},
                                                        "runs": runs}))
    assert _script().main([str(tmp_path)]) == 0
    record = json.loads((tmp_path / "reanalysis.json").read_text())
    assert record["margin"] == 0.02 and record["commit"] and "shared" in record["note"]
    entries = record["comparisons"]
    assert len(entries) == 4 and entries[0]["role"] == "primary"  # 2 pairs present x 2 sets
    assert (entries[0]["a"], entries[0]["b"], entries[0]["set"]) == (*arms[:2], "test")
    assert [e["role"] for e in entries[1:]] == ["secondary"] * 3  # the primary's OOD set too
    assert all(e["holm_p"] >= e["seed_level"]["p_value"] for e in entries[1:])
    assert "CE + Align CKA vs CE" in capsys.readouterr().out


def test_reanalyse_refuses_a_bad_path_in_one_line(tmp_path, capsys):
    assert _script().main([str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "per_item.json" in err


def test_a_comparison_line_prints_its_interval_or_why_there_is_none():
    """The report's line for one comparison: with seeds to spread over, the interval, p and the
    equivalence verdict; with one seed (as ``make demo`` runs) the reason the seed-level tests are
    undefined, never "95% CI +nan to +nan"."""
    from cdist.report import _comparison_line

    gen = torch.Generator().manual_seed(3)

    def line(n_seeds: int) -> str:
        a = [torch.rand(40, generator=gen) < 0.8 for _ in range(n_seeds)]
        b = [torch.rand(40, generator=gen) < 0.7 for _ in range(n_seeds)]
        record = stats.compare(a, b, margin=0.02)
        return _comparison_line({"a": "circuit distilled, CE + Align CKA",
                                 "b": "circuit distilled, CE", "set": "test", "role": "primary",
                                 **record})

    three, one = line(3), line(1)
    assert "95% CI" in three and "equivalence at ±0.02" in three and "nan" not in three
    assert three.startswith("CE + Align CKA vs CE [test, primary]: difference ")
    assert "nan" not in one and "95% CI" not in one
    assert ("(one seed: no run-to-run spread to test against; the difference is one run's), "
            "**inconclusive**; clustered McNemar p ") in one
