"""Rank statistics against scipy; figures are written as HTML and PNG that work offline."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cdist import plots, stats
from cdist.types import Head

scipy_stats = pytest.importorskip("scipy.stats")

values = st.lists(st.integers(-3, 3) | st.floats(-1e3, 1e3, allow_nan=False), min_size=3,
                  max_size=30)


@settings(max_examples=60, deadline=None)
@given(values)
def test_rankdata_matches_scipy(xs):
    x = torch.tensor(xs, dtype=torch.float64)
    want = torch.tensor(scipy_stats.rankdata(xs), dtype=torch.float64)
    assert torch.allclose(stats.rankdata(x), want)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_spearman_matches_scipy(data):
    n = data.draw(st.integers(3, 25))
    a = data.draw(st.lists(st.integers(-4, 4), min_size=n, max_size=n))
    b = data.draw(st.lists(st.floats(-10, 10, allow_nan=False), min_size=n, max_size=n))
    ours = stats.spearman(torch.tensor(a, dtype=torch.float64),
                          torch.tensor(b, dtype=torch.float64))
    if len(set(a)) < 2 or len(set(b)) < 2:
        assert ours != ours  # NaN for a constant input, as scipy
        return
    assert ours == pytest.approx(scipy_stats.spearmanr(a, b).statistic, abs=1e-9)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=200))
def test_mcnemar_matches_statsmodels(pairs):
    from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar

    a = torch.tensor([p[0] for p in pairs])
    b = torch.tensor([p[1] for p in pairs])
    ours = stats.mcnemar(a, b)
    table = [[int((a & b).sum()), int((a & ~b).sum())], [int((~a & b).sum()), int((~a & ~b).sum())]]
    theirs = sm_mcnemar(table, exact=True)
    assert (ours["b"], ours["c"]) == (table[0][1], table[1][0])
    assert ours["p_value"] == pytest.approx(float(theirs.pvalue), rel=1e-9, abs=1e-12)
    two_sided = (min(1.0, 2 * scipy_stats.binom.cdf(min(ours["b"], ours["c"]),
                                                    ours["n_discordant"], 0.5))
                 if ours["n_discordant"] else 1.0)
    assert ours["p_value"] == pytest.approx(two_sided, rel=1e-9)


def test_mcnemar_refuses_unpaired_results():
    with pytest.raises(ValueError, match="same items"):
        stats.mcnemar(torch.ones(3), torch.ones(4))


def test_spearman_refuses_mismatched_sizes():
    with pytest.raises(ValueError, match="one size"):
        stats.spearman(torch.zeros(3), torch.zeros(4))


def test_head_heatmap_writes_html(tmp_path):
    fig = plots.head_heatmap(torch.tensor([[0.1, -0.2], [0.0, 0.5]]), title="t", colorbar="c",
                             marked=[Head(1, 1)])
    assert len(fig.layout.shapes) == 1 and fig.layout.shapes[0].x0 == 0.5
    written = plots.save_figure(fig, tmp_path / "heat")
    assert [p.suffix for p in written] == [".html", ".png"] and all(p.exists() for p in written)


def test_figures_work_offline(tmp_path):
    """The HTML loads plotly.js from beside it, never from a network; the PNG is drawn without a
    browser, at the figure's size, in its colour scale."""
    import numpy as np
    from matplotlib.image import imread

    from cdist import static_png

    fig = plots.head_heatmap(torch.tensor([[-1.0, 1.0], [0.5, -0.5]]), title="t", colorbar="c",
                             marked=[Head(0, 1)])
    html, png = plots.save_figure(fig, tmp_path / "figs" / "heat")
    page = html.read_text()
    assert "cdn.plot.ly" not in page and '<script src="https://' not in page
    assert 'src="plotly.min.js"' in page
    assert (tmp_path / "figs" / "plotly.min.js").stat().st_size > 1_000_000
    image = imread(png)
    assert image.shape[:2] == (fig.layout.height, fig.layout.width)
    # plotly's RdBu from its stored (fraction, colour) pairs: -1 is its darkest red, +1 its blue
    cmap = static_png._cmap(fig.data[0].colorscale)
    assert np.allclose(cmap(0.0)[:3], (103 / 255, 0, 31 / 255))
    assert np.allclose(cmap(1.0)[:3], (5 / 255, 48 / 255, 97 / 255))
    rgb = image[..., :3].reshape(-1, 3)
    assert (np.abs(rgb - cmap(0.0)[:3]).sum(1) < 0.02).any()  # the -1 cell is drawn
    assert (np.abs(rgb - cmap(1.0)[:3]).sum(1) < 0.02).any()


@settings(max_examples=30, deadline=None)
@given(st.lists(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=40),
                min_size=1, max_size=5))
def test_pooled_mcnemar_is_the_cmh_test_over_matched_pairs(strata):
    """Against statsmodels' Cochran-Mantel-Haenszel test with every (item, seed) pair as its own
    2x2 stratum (method x correct), and against scipy's exact binomial test on the pooled
    discordant counts."""
    import numpy as np
    from statsmodels.stats.contingency_tables import StratifiedTable

    a = [torch.tensor([p[0] for p in s]) for s in strata]
    b = [torch.tensor([p[1] for p in s]) for s in strata]
    ours = stats.mcnemar_pooled(a, b)
    assert (ours["b"], ours["c"]) == (sum(int((x & ~y).sum()) for x, y in zip(a, b, strict=True)),
                                      sum(int((~x & y).sum()) for x, y in zip(a, b, strict=True)))
    n = ours["n_discordant"]
    exact = scipy_stats.binomtest(ours["b"], n, 0.5).pvalue if n else 1.0
    assert ours["p_value"] == pytest.approx(exact, rel=1e-9)
    tables = [np.array([[int(x), 1 - int(x)], [int(y), 1 - int(y)]]) for s in strata for x, y in s]
    informative = [t for t in tables if t[:, 0].sum() == 1]  # concordant pairs carry no information
    if not informative:
        assert ours["statistic"] == 0.0 and n == 0
        return
    cmh = StratifiedTable(informative).test_null_odds(correction=False)
    assert ours["statistic"] == pytest.approx(float(cmh.statistic), rel=1e-9, abs=1e-12)
    assert ours["p_value_chi2"] == pytest.approx(float(cmh.pvalue), rel=1e-7, abs=1e-12)


def test_pooled_mcnemar_refuses_unmatched_strata():
    with pytest.raises(ValueError, match="same strata"):
        stats.mcnemar_pooled([torch.ones(3)], [torch.ones(3), torch.ones(3)])
