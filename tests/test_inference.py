"""Statistics across seeds (geomlab.geometry.inference) against independent computations: scipy's own
tests and intervals, a brute-force inversion of the t-test, a hand-written bootstrap, Holm written out,
an enumeration of every permutation, the partial correlation's closed form; and the exact R@1 grid and
the weight distance (geomlab.geometry.retrieval, .forgetting; geomlab.weights) by hand."""
import itertools
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy import stats

from geomlab.geometry import accuracy_matrix, continual_metrics, metrics_from_ranks
from geomlab.geometry.inference import (ALL_EQUAL, EXACT_P, cluster_bootstrap, exact_permutation_p, holm, mean_ci,
                                        paired_comparison, partial_spearman, spearman)
from geomlab.weights import weight_distance


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
    assert one == {"n": 1, "mean": 0.4, "sd": None, "ci": None, "all_equal": False}
    assert mean_ci([]) == {"n": 0, "mean": None, "sd": None, "ci": None, "all_equal": False}
    # no spread: the mean, no interval (never ± 0), and the flag
    assert mean_ci([0.25, 0.25, 0.25]) == {"n": 3, "mean": 0.25, "sd": 0.0, "ci": None, "all_equal": True}
    # equal up to rounding (0.1 + 0.2 ≠ 0.3 in floats) counts as equal; a real spread does not
    assert mean_ci([0.1 + 0.2, 0.3, 0.3])["all_equal"] and not mean_ci([0.3, 0.3, 0.3 + 1e-9])["all_equal"]


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
    assert equal["ci"] is None and equal["all_equal"]
    assert not r["all_equal"] and not single["all_equal"]
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
    few = spearman([1, 2, 3, 4], [2, 1, 4, 3])
    assert few["rho"] is None and few["p_value"] is None and few["ci"] is None and "at least 5" in few["reason"]
    const = spearman([1, 1, 1, 1, 1], [1, 2, 3, 4, 5])  # a constant variable has no rank correlation
    assert const["rho"] is None and "constant" in const["reason"]
    r = spearman([1, 2, 3, 4, 5, 6, 7, 8], [2, 4, 6, 8, 10, 12, 14, 16], n_resamples=500)
    assert r["rho"] == pytest.approx(1.0) and r["ci"] == pytest.approx([1.0, 1.0]) and r["reason"] is None
    # with five points some resamples draw one point only: they have no ρ and are left out
    r = spearman([1, 2, 3, 4, 5], [1, 3, 2, 5, 4], n_resamples=2000)
    assert 0 < r["degenerate_resamples"] < 2000 and all(math.isfinite(v) for v in r["ci"])
    r = spearman([1, None, 3, 4, 5, 6, 7], [2, 7, float("nan"), 1, 0, 3, 3])
    assert r["n"] == 5 and r["rho"] is not None
    with pytest.raises(ValueError, match="align"):
        spearman([1, 2], [1])


def test_holm_against_statsmodels_and_the_formula_written_out():
    from statsmodels.stats.multitest import multipletests
    p = [0.01, 0.04, 0.03, 0.2, 0.0001]
    assert holm(p) == pytest.approx(list(multipletests(p, method="holm")[1]), abs=1e-15)
    # Holm: sort ascending, p_(i) · (m − i + 1) (i from 1), running maximum, capped at 1
    order = np.argsort(p)
    adj = np.minimum(1, np.maximum.accumulate([p[j] * (len(p) - i) for i, j in enumerate(order)]))
    by_hand = np.empty(len(p))
    by_hand[order] = adj
    assert holm(p) == pytest.approx(list(by_hand), abs=1e-15)
    assert holm(p) == pytest.approx([0.04, 0.09, 0.09, 0.2, 0.0005])
    # a comparison without a test is no member of the family
    assert holm([0.01, None, 0.04]) == pytest.approx([0.02, None, 0.04])
    assert holm([None, None]) == [None, None] and holm([]) == []


def test_zero_variance_paired_difference_has_no_p_no_ci_and_says_so():
    shifted = paired_comparison([0.5, 0.75, 1.0], [0.25, 0.5, 0.75])  # every difference 0.25
    assert shifted["mean_difference"] == 0.25 and shifted["all_equal"]
    assert shifted["ci"] is None and shifted["p_value"] is None  # never p = 0 or ± 0
    # the same forgetting in every seed, reached from different R@1 (floats of 3/200, 17/200, ...)
    near = paired_comparison([0.1 + 0.2, 0.7, 0.4], [0.1, 0.5, 0.2])
    assert near["all_equal"] and near["p_value"] is None and near["ci"] is None
    assert ALL_EQUAL == "all seeds equal"


def test_r1_of_equal_hit_counts_is_the_same_float64():
    # 3 hits among 200 queries, in two different orders: float32 means could differ in the last bit
    a = torch.full((200,), 7, dtype=torch.long)
    a[[0, 1, 2]] = 0
    b = a.flip(0).clone()
    b[[5, 150, 199]], b[[197, 198]] = 0, 9
    ma, mb = metrics_from_ranks(a, a), metrics_from_ranks(b, b)
    assert ma["image_to_text_R@1"] == mb["image_to_text_R@1"] == 3 / 200 and type(ma["image_to_text_R@1"]) is float
    assert ma["image_to_text_R@10"] == mb["image_to_text_R@10"] == 1.0
    # the same forgetting from different counts: 31/200 → 28/200 and 7/200 → 4/200 give one float
    A1 = accuracy_matrix([{"d": {"image_to_text_R@1": 31 / 200, "text_to_image_R@1": 31 / 200}},
                          {"d": {"image_to_text_R@1": 28 / 200, "text_to_image_R@1": 28 / 200}}])
    A2 = accuracy_matrix([{"d": {"image_to_text_R@1": 7 / 200, "text_to_image_R@1": 7 / 200}},
                          {"d": {"image_to_text_R@1": 4 / 200, "text_to_image_R@1": 4 / 200}}])
    assert 31 / 200 - 28 / 200 != 7 / 200 - 4 / 200  # what plain float arithmetic gives
    f1, f2 = continual_metrics(A1, [0]), continual_metrics(A2, [0])
    assert f1["forgetting"][0] == f2["forgetting"][0] == 3 / 200
    assert f1["bwt"] == f2["bwt"] == -3 / 200 and f1["mean_forgetting"] == f2["mean_forgetting"]
    assert A1.dtype == torch.float64


def brute_force_cluster_ci(x, y, clusters, seed, n_resamples, level=0.95):
    """The cluster bootstrap written out: draw clusters with replacement, keep all their points."""
    labels = list(dict.fromkeys(clusters))
    members = [[i for i, c in enumerate(clusters) if c == lab] for lab in labels]
    draws = np.random.default_rng(seed).integers(0, len(labels), size=(n_resamples, len(labels)))
    rhos = []
    for row in draws:
        idx = [i for c in row for i in members[c]]
        xs, ys = np.asarray(x)[idx], np.asarray(y)[idx]
        if np.all(xs == xs[0]) or np.all(ys == ys[0]):
            continue
        rhos.append(stats.spearmanr(xs, ys).statistic)
    return list(np.quantile(rhos, [(1 - level) / 2, (1 + level) / 2])), n_resamples - len(rhos)


def test_cluster_bootstrap_is_seeded_and_equals_a_brute_force_resampling():
    x = [0.1, 0.4, 0.3, 0.9, 0.8, 0.2, 0.5, 0.7, 0.6, 0.05, 0.35, 0.95]
    y = [1.0, 2.5, 1.5, 3.0, 2.8, 0.4, 1.9, 2.2, 2.1, 0.3, 1.1, 3.3]
    clusters = ["a", "a", "b", "b", "c", "c", "d", "d", "e", "e", "f", "f"]
    r = spearman(x, y, clusters=clusters, seed=5, n_resamples=300)
    assert r["clusters"] == 6 and r["n"] == 12 and "cluster" in r["ci_method"]
    ci, degenerate = brute_force_cluster_ci(x, y, clusters, 5, 300)
    assert r["ci"] == pytest.approx(ci, abs=1e-12) and r["degenerate_resamples"] == degenerate
    assert spearman(x, y, clusters=clusters, seed=5, n_resamples=300) == r  # reproducible
    assert spearman(x, y, clusters=clusters, seed=6, n_resamples=300)["ci"] != r["ci"]
    # clusters of unequal size go the slower way: the same draws, the same interval as written out
    uneven = ["a", "a", "a", "b", "c", "c", "d", "d", "e", "e", "e", "f"]
    ci, degenerate = brute_force_cluster_ci(x, y, uneven, 2, 200)
    r = spearman(x, y, clusters=uneven, seed=2, n_resamples=200)
    assert r["ci"] == pytest.approx(ci, abs=1e-12) and r["degenerate_resamples"] == degenerate
    # too few clusters: ρ and p, no interval, and the reason
    few = spearman(x, y, clusters=["a"] * 6 + ["b"] * 6)
    assert few["rho"] is not None and few["ci"] is None and "at least 5" in few["reason"]
    # the statistic per resample, as the function returns it
    rows = cluster_bootstrap(lambda a, axis=-1: a.sum(axis=axis), [np.arange(4.0)], [0, 0, 1, 1], seed=1,
                             n_resamples=3)
    draws = np.random.default_rng(1).integers(0, 2, size=(3, 2))
    assert rows.tolist() == [sum({0: 1.0, 1: 5.0}[c] for c in row) for row in draws]


def test_exact_permutation_p_against_every_permutation():
    x = np.array([0.3, 1.2, 0.7, 2.2, 1.9, 0.1])
    y = np.array([1.0, 0.8, 2.0, 2.5, 1.1, 0.2])
    rx, ry = stats.rankdata(x), stats.rankdata(y)
    observed = np.corrcoef(rx, ry)[0, 1]
    null = np.array([np.corrcoef(rx[list(p)], ry)[0, 1] for p in itertools.permutations(range(6))])
    assert len(null) == 720
    tol = 1e-12
    p_by_hand = min(1.0, 2 * min(np.mean(null <= observed + tol), np.mean(null >= observed - tol)))
    r = spearman(x, y, n_resamples=0)
    assert r["p_method"] == EXACT_P and r["ci"] is None
    assert r["rho"] == pytest.approx(observed, abs=1e-12) and r["p_value"] == pytest.approx(p_by_hand, abs=1e-12)
    assert exact_permutation_p(rx, ry) == pytest.approx(p_by_hand, abs=1e-12)
    # with ties (average ranks) too
    yt = np.array([1.0, 1.0, 2.0, 2.0, 1.1, 0.2])
    rt = stats.rankdata(yt)
    obs_t = np.corrcoef(rx, rt)[0, 1]
    null_t = np.array([np.corrcoef(rx[list(p)], rt)[0, 1] for p in itertools.permutations(range(6))])
    p_t = min(1.0, 2 * min(np.mean(null_t <= obs_t + tol), np.mean(null_t >= obs_t - tol)))
    assert spearman(x, yt, n_resamples=0)["p_value"] == pytest.approx(p_t, abs=1e-12)
    # from 10 points on: scipy's t approximation
    big = spearman(np.arange(10.0), [3, 1, 2, 5, 4, 7, 6, 9, 8, 10], n_resamples=0)
    assert "spearmanr" in big["p_method"]
    assert big["p_value"] == pytest.approx(stats.spearmanr(np.arange(10.0), [3, 1, 2, 5, 4, 7, 6, 9, 8, 10]).pvalue)


def test_partial_spearman_against_the_closed_form_and_residuals():
    rng = np.random.default_rng(4)
    z = rng.normal(size=30)
    x = z + rng.normal(size=30)
    y = z + 0.5 * x + rng.normal(size=30)
    r = partial_spearman(x, y, z, clusters=np.repeat(np.arange(6), 5), seed=3, n_resamples=500)
    rx, ry, rz = (stats.rankdata(v) for v in (x, y, z))
    # the closed form of a first-order partial correlation, on ranks
    rxy, rxz, ryz = (np.corrcoef(a, b)[0, 1] for a, b in ((rx, ry), (rx, rz), (ry, rz)))
    closed = (rxy - rxz * ryz) / math.sqrt((1 - rxz ** 2) * (1 - ryz ** 2))
    # pingouin's way: residuals of a least-squares fit (numpy lstsq) of each rank on [1, rank z]
    design = np.column_stack([np.ones(30), rz])
    ex = rx - design @ np.linalg.lstsq(design, rx, rcond=None)[0]
    ey = ry - design @ np.linalg.lstsq(design, ry, rcond=None)[0]
    assert r["rho"] == pytest.approx(closed, abs=1e-12)
    assert r["rho"] == pytest.approx(np.corrcoef(ex, ey)[0, 1], abs=1e-12)
    t = closed * math.sqrt(27 / (1 - closed ** 2))
    assert r["p_value"] == pytest.approx(2 * stats.t.sf(abs(t), 27), rel=1e-9)
    assert r["ci"][0] < r["rho"] < r["ci"][1] and r["clusters"] == 6
    # controlling for a variable that carries it all leaves nothing
    gone = partial_spearman([1, 2, 3, 4, 5, 6], [2, 1, 4, 3, 6, 5], [1, 2, 3, 4, 5, 6])
    assert gone["rho"] is None and "control" in gone["reason"]


def test_weight_distance_by_hand():
    base = {"w": torch.tensor([[3.0, 0.0], [0.0, 4.0]]), "b": torch.tensor([0.0], dtype=torch.float16),
            "ids": torch.tensor([1, 2, 3])}  # integer buffers are no weights
    moved = {"w": torch.tensor([[3.0, 1.0], [0.0, 4.0]]), "b": torch.tensor([2.0], dtype=torch.float16),
             "ids": torch.tensor([7, 8, 9])}
    # ‖θ − θ_base‖ = √(1 + 4) = √5, ‖θ_base‖ = √(9 + 16) = 5
    assert weight_distance(moved, base) == pytest.approx(math.sqrt(5) / 5, rel=1e-15)
    assert weight_distance(base, base) == 0.0
    assert weight_distance(moved, {k: torch.zeros_like(v) for k, v in base.items()}) is None  # ‖θ_base‖ = 0
    with pytest.raises(ValueError, match="shape"):
        weight_distance({**moved, "w": torch.zeros(3)}, base)
    with pytest.raises(ValueError, match="differ"):
        weight_distance({"w": moved["w"]}, base)


def test_importing_geomlab_data_does_not_import_zeroshot():
    code = ("import sys, geomlab.data, geomlab.data.phases, geomlab.data.shapes, geomlab.data.readers, "
            "geomlab.data.imagefolder\n"
            "assert 'geomlab.zeroshot' not in sys.modules, 'geomlab.data imported geomlab.zeroshot'\n"
            "import geomlab.zeroshot as z\n"  # what moved is still reachable where it was
            "assert z.imagefolder_set is geomlab.data.imagefolder.imagefolder_set")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
