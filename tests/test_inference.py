"""Statistics across seeds (geomlab.geometry.inference) against independent computations: scipy's own
tests and intervals, a brute-force inversion of the t-test, a hand-written bootstrap."""
import math

import numpy as np
import pytest
from scipy import stats

from geomlab.geometry.inference import mean_ci, paired_comparison, spearman


def brute_force_t_interval(x, level=0.95, grid=200_001):
    """The set of μ0 that a two-sided one-sample t-test does not reject at 1 − level, on a fine grid."""
    x = np.asarray(x, float)
    span = 10 * x.std(ddof=1) + 1
    mu = np.linspace(x.mean() - span, x.mean() + span, grid)
    keep = mu[stats.ttest_1samp(x[:, None], mu[None, :], axis=0).pvalue >= 1 - level]
    return keep.min(), keep.max(), mu[1] - mu[0]


@pytest.mark.parametrize("x", [[0.61, 0.55, 0.70], [1.0, 2.0], [3.2, -1.0, 0.4, 0.4, 2.2, 5.0, -0.3]])
def test_mean_ci_is_the_t_interval(x):
    r = mean_ci(x)
    assert r["n"] == len(x) and r["mean"] == pytest.approx(np.mean(x), abs=1e-15)
    assert r["sd"] == pytest.approx(np.std(x, ddof=1), rel=1e-12)
    scipy_ci = stats.ttest_1samp(x, 0.0).confidence_interval(0.95)
    assert r["ci"] == pytest.approx([scipy_ci.low, scipy_ci.high], rel=1e-10, abs=1e-12)
    lo, hi, step = brute_force_t_interval(x)
    assert abs(r["ci"][0] - lo) <= step and abs(r["ci"][1] - hi) <= step


def test_mean_ci_covers_the_true_mean_95_percent_of_the_time():
    rng = np.random.default_rng(7)
    hits = sum(lo <= 1.5 <= hi for lo, hi in (mean_ci(rng.normal(1.5, 2.0, size=3))["ci"] for _ in range(4000)))
    assert abs(hits / 4000 - 0.95) < 0.012  # 3.5 binomial standard errors


def test_mean_ci_with_one_value_or_none_has_no_interval():
    one = mean_ci([0.4, None, float("nan")])
    assert one == {"n": 1, "mean": 0.4, "sd": None, "ci": None}
    assert mean_ci([]) == {"n": 0, "mean": None, "sd": None, "ci": None}
    same = mean_ci([0.25, 0.25, 0.25])
    assert same["ci"] == [0.25, 0.25] and same["sd"] == 0.0  # no spread: the interval is the point


def test_paired_comparison_is_the_paired_t_test():
    a = [0.62, 0.48, 0.71, 0.55, 0.60]
    b = [0.50, 0.47, 0.58, 0.52, 0.49]
    r = paired_comparison(a, b)
    d = np.subtract(a, b)
    assert r["n"] == 5 and r["mean_difference"] == pytest.approx(d.mean(), abs=1e-15)
    assert r["p_value"] == pytest.approx(stats.ttest_rel(a, b).pvalue, rel=1e-12)
    assert r["p_value"] == pytest.approx(stats.ttest_1samp(d, 0.0).pvalue, rel=1e-10)  # the same test, another way
    ci = stats.ttest_1samp(d, 0.0).confidence_interval(0.95)
    assert r["ci"] == pytest.approx([ci.low, ci.high], rel=1e-10)
    assert "ttest_rel" in r["test"]


def test_paired_comparison_edge_cases():
    # pairs with a missing side are left out
    r = paired_comparison([0.5, None, 0.7, 0.9], [0.4, 0.3, float("nan"), 0.6])
    assert r["n"] == 2 and r["mean_difference"] == pytest.approx(0.2)
    assert r["p_value"] == pytest.approx(stats.ttest_rel([0.5, 0.9], [0.4, 0.6]).pvalue)
    single = paired_comparison([0.5], [0.4])
    assert single["n"] == 1 and single["ci"] is None and single["p_value"] is None
    equal = paired_comparison([0.5, 0.6, 0.7], [0.5, 0.6, 0.7])
    assert equal["mean_difference"] == 0.0 and equal["p_value"] is None  # 0/0: the test does not exist
    shifted = paired_comparison([0.5, 0.75, 1.0], [0.25, 0.5, 0.75])
    assert shifted["mean_difference"] == 0.25 and shifted["ci"] == [0.25, 0.25] and shifted["p_value"] == 0.0
    with pytest.raises(ValueError, match="align"):
        paired_comparison([1, 2], [1])


def _ranks(v):
    """Ranks of untied values by sorting: independent of scipy's rankdata."""
    r = np.empty(len(v))
    r[np.argsort(v)] = np.arange(len(v))
    return r


def test_spearman_rho_p_and_bootstrap_interval():
    rng = np.random.default_rng(3)
    x = rng.normal(size=24)
    y = 0.6 * x + rng.normal(size=24)
    r = spearman(x, y, seed=11, n_resamples=4000)
    assert r["n"] == 24
    assert r["rho"] == pytest.approx(np.corrcoef(_ranks(x), _ranks(y))[0, 1], abs=1e-12)
    ref = stats.spearmanr(x, y)
    assert r["rho"] == pytest.approx(ref.statistic, abs=1e-12) and r["p_value"] == pytest.approx(ref.pvalue, rel=1e-10)
    assert r["degenerate_resamples"] == 0
    # scipy's own bootstrap with scipy's own spearmanr as the statistic, same seed: the same interval
    own = stats.bootstrap((x, y), lambda a, b: stats.spearmanr(a, b).statistic, paired=True, vectorized=False,
                          n_resamples=4000, method="percentile", random_state=np.random.default_rng(11))
    assert r["ci"] == pytest.approx(list(own.confidence_interval), abs=1e-12)
    # a hand-written percentile bootstrap (another generator) agrees to Monte-Carlo error
    g = np.random.default_rng(99)
    idx = g.integers(0, 24, size=(4000, 24))
    rhos = [np.corrcoef(stats.rankdata(x[i]), stats.rankdata(y[i]))[0, 1] for i in idx]
    assert r["ci"] == pytest.approx(list(np.quantile(rhos, [0.025, 0.975])), abs=0.04)
    assert r["ci"][0] < r["rho"] < r["ci"][1]
    assert spearman(x, y, seed=11, n_resamples=4000) == r  # seeded: reproducible


def test_spearman_edge_cases():
    assert spearman([1, 2], [2, 1])["rho"] is None  # fewer than three points
    assert spearman([1, 1, 1, 1], [1, 2, 3, 4])["rho"] is None  # a constant variable has no rank correlation
    r = spearman([1, 2, 3, 4, 5, 6, 7, 8], [2, 4, 6, 8, 10, 12, 14, 16], n_resamples=500)
    assert r["rho"] == pytest.approx(1.0) and r["ci"] == pytest.approx([1.0, 1.0])
    # with four points some resamples draw one point only: they have no ρ and are left out
    r = spearman([1, 2, 3, 4], [1, 3, 2, 4], n_resamples=2000)
    assert 0 < r["degenerate_resamples"] < 2000 and all(math.isfinite(v) for v in r["ci"])
    assert spearman([1, None, 3, 4, 5], [2, 7, float("nan"), 1, 0])["n"] == 3
