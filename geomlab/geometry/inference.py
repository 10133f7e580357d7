"""Statistics across seeds and runs (docs/definitions.md, "Statistics across seeds"): a mean with its
95% t-interval, a paired comparison with a paired t-test, Holm's correction across the strategies
compared, and Spearman's (and partial Spearman's) rank correlation with a seeded cluster-bootstrap
interval. Each returns a JSON-ready dict; a number that does not exist is None, never 0.

Seeds that all agree (zero spread, up to floating-point rounding) have no interval and no test: the
result says so ("all_equal"), rather than giving ± 0 or p = 0.
"""
from __future__ import annotations

import functools
import gc
import math
from typing import Sequence

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 9999
PAIRED_TEST = "paired t-test, two-sided (scipy.stats.ttest_rel)"
HOLM = "Holm–Bonferroni across the strategies compared, within each metric (statsmodels multipletests, holm)"
CLUSTER_BOOTSTRAP = ("percentile cluster bootstrap: clusters drawn with replacement, all points of each drawn "
                     "cluster kept (numpy default_rng(seed).integers)")
POINT_BOOTSTRAP = "percentile bootstrap over points (default_rng(seed).integers)"
EXACT_P = "exact permutation test, two-sided (scipy.stats.permutation_test, pairings, all n! orderings)"
SPEARMAN_P = "scipy.stats.spearmanr, two-sided (t approximation)"
PARTIAL_P = "t-test on n − 3 degrees of freedom, two-sided (approximate)"
MIN_POINTS = 5      # fewer points: no rank correlation at all
MIN_CLUSTERS = 5    # fewer clusters: no bootstrap interval (3 clusters have only 10 distinct resamples)
EXACT_BELOW = 10    # fewer points: the exact permutation p-value instead of the t approximation
EQUAL_RTOL = 1e-12  # values whose spread is within this share of their magnitude count as all equal
ALL_EQUAL = "all seeds equal"


def _finite(v) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def _values(values: Sequence) -> np.ndarray:
    """The values that exist (None and NaN dropped), as float64."""
    return np.asarray([float(v) for v in values if v is not None and math.isfinite(float(v))], dtype=np.float64)


def _exists(*vs) -> bool:
    return all(v is not None and math.isfinite(float(v)) for v in vs)


def _pairs(measure: str, *columns: Sequence) -> tuple[np.ndarray, ...]:
    """The rows in which every column's value exists (None and NaN dropped), as float64 arrays."""
    if len({len(c) for c in columns}) != 1:
        raise ValueError(f"{measure}: {' against '.join(str(len(c)) for c in columns)} values; the pairs must align")
    keep = [row for row in zip(*columns) if _exists(*row)]
    return tuple(np.asarray([float(r[i]) for r in keep], dtype=np.float64) for i in range(len(columns)))


def all_equal(x: np.ndarray, scale: float | None = None) -> bool:
    """True for two or more values that agree up to floating-point rounding: their spread is at most
    EQUAL_RTOL × `scale` (default: the largest magnitude among them; 0 when all are 0)."""
    if len(x) < 2:
        return False
    scale = float(np.max(np.abs(x))) if scale is None else scale
    return float(np.ptp(x)) <= EQUAL_RTOL * scale


def t_interval(x: np.ndarray, confidence: float = CONFIDENCE) -> list[float] | None:
    """mean ± t_{(1+c)/2, n−1} · s / √n (s: the sample standard deviation); None for n < 2 and for
    values that are all equal (no spread: no interval, never a zero-width one)."""
    n = len(x)
    if n < 2 or all_equal(x):
        return None
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * x.std(ddof=1) / math.sqrt(n)
    m = x.mean()
    return [float(m - half), float(m + half)]


def mean_ci(values: Sequence, confidence: float = CONFIDENCE) -> dict:
    """{"n", "mean", "sd", "ci": [lo, hi] or None, "all_equal"}: the mean of the values that exist and
    its t-interval. "ci" and "sd" are None with fewer than two values, "mean" None with none; values
    that all agree (`all_equal`) give sd 0, no interval and "all_equal": True."""
    x = _values(values)
    same = all_equal(x)
    sd = (0.0 if same else float(x.std(ddof=1))) if len(x) > 1 else None
    return {"n": int(len(x)), "mean": float(x.mean()) if len(x) else None, "sd": sd,
            "ci": None if same else t_interval(x, confidence), "all_equal": same}


def paired_comparison(a: Sequence, b: Sequence, confidence: float = CONFIDENCE) -> dict:
    """a against b on the same units (seeds): the differences a_i − b_i over the units where both
    exist, their mean, its t-interval and the paired t-test's two-sided p-value (H0: mean difference
    0). {"n", "mean_difference", "ci", "p_value", "all_equal", "test"}. "ci" and "p_value" are None
    with fewer than two pairs, and when every difference is the same (up to rounding of the values
    compared): then the test is undefined (t = d̄/0) and "all_equal" is True."""
    x, y = _pairs("paired_comparison", a, b)
    d = x - y
    same = len(d) > 1 and all_equal(d, max(float(np.max(np.abs(x))), float(np.max(np.abs(y)))))
    p, ci = None, None
    if len(d) > 1 and not same:
        p = _finite(stats.ttest_rel(x, y).pvalue)
        ci = t_interval(d, confidence)
    return {"n": int(len(d)), "mean_difference": float(d.mean()) if len(d) else None,
            "ci": ci, "p_value": p, "all_equal": same, "test": PAIRED_TEST}


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm–Bonferroni adjusted p-values of one family (statsmodels.stats.multitest.multipletests,
    method "holm"); a None (no test) stays None and is not counted in the family."""
    from statsmodels.stats.multitest import multipletests  # imports pandas: only when needed

    have = [i for i, p in enumerate(p_values) if p is not None]
    out: list[float | None] = [None] * len(p_values)
    if have:
        # multipletests runs gc.collect() for "holm": over a heap holding torch and plotly that is ~0.4 s a
        # call; frozen objects (gc.freeze, undone right after) are skipped by it, nothing else changes
        gc.freeze()
        try:
            adjusted = multipletests([p_values[i] for i in have], method="holm")[1]
        finally:
            gc.unfreeze()
        for i, q in zip(have, adjusted):
            out[i] = float(q)
    return out


# ----------------------------------------------------------------------------- rank correlations


def _ranks(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Average ranks along `axis`, centred."""
    r = stats.rankdata(x, axis=axis)
    return r - r.mean(axis=axis, keepdims=True)


def _pearson_centred(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    """Pearson's r of rows that are already centred; NaN where a row is all 0 (constant)."""
    den = np.sqrt((a * a).sum(axis=axis) * (b * b).sum(axis=axis))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (a * b).sum(axis=axis) / den
    return np.where(den > 0, np.clip(r, -1.0, 1.0), np.nan)


def _spearman_rows(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    """Spearman's ρ along `axis` (Pearson correlation of average ranks); NaN where a row is constant."""
    return _pearson_centred(_ranks(x, axis), _ranks(y, axis), axis)


def _residuals(r: np.ndarray, rz: np.ndarray, axis: int = -1) -> np.ndarray:
    """The centred ranks r less their least-squares fit on the centred ranks rz (with intercept)."""
    szz = (rz * rz).sum(axis=axis, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        beta = np.where(szz > 0, (r * rz).sum(axis=axis, keepdims=True) / np.where(szz > 0, szz, 1), 0.0)
    res = r - beta * rz
    # r collinear with rz leaves only rounding (~1e-16): no variation, exactly 0
    gone = (res * res).sum(axis=axis, keepdims=True) <= 1e-20 * (r * r).sum(axis=axis, keepdims=True)
    return np.where(gone, 0.0, res)


def _partial_rows(x: np.ndarray, y: np.ndarray, z: np.ndarray, axis: int = -1) -> np.ndarray:
    """Partial Spearman of x and y given z along `axis`: the ranks of x and of y each residualised on
    the ranks of z, then the Pearson correlation of the two residuals; NaN where undefined."""
    rz = _ranks(z, axis)
    return _pearson_centred(_residuals(_ranks(x, axis), rz, axis), _residuals(_ranks(y, axis), rz, axis), axis)


@functools.lru_cache(maxsize=256)
def _pairings_null(a: tuple, b: tuple) -> np.ndarray:
    """Σ_i a_π(i) b_i over all n! permutations π (scipy.stats.permutation_test, pairings, exact). It
    depends on the two multisets only, so it is computed once per (sorted a, sorted b): once per n
    for untied ranks."""
    bb = np.asarray(b)
    res = stats.permutation_test((np.asarray(a),), lambda u, axis=-1: u @ bb, permutation_type="pairings",
                                 n_resamples=np.inf, vectorized=True, alternative="two-sided", batch=40320)
    return np.asarray(res.null_distribution)


def exact_permutation_p(a: np.ndarray, b: np.ndarray) -> float | None:
    """Two-sided p of the Pearson correlation of `a` and `b` (ranks, or rank residuals) over all n!
    pairings: scipy.stats.permutation_test (permutation_type="pairings", n_resamples=inf) with the
    statistic Σ a_i b_i of the centred values (the correlation times a constant: the same test), and
    scipy's own two-sided rule, p = min(1, 2 min(P(null ≤ obs), P(null ≥ obs))), with its relative
    tolerance of 100 ε for values equal in theory."""
    a, b = np.asarray(a, float) - np.mean(a), np.asarray(b, float) - np.mean(b)
    null = _pairings_null(tuple(np.sort(a).tolist()), tuple(np.sort(b).tolist()))
    observed = float(a @ b)
    gamma = abs(np.finfo(np.float64).eps * 100 * observed)
    less, greater = np.mean(null <= observed + gamma), np.mean(null >= observed - gamma)
    return _finite(min(1.0, 2 * min(less, greater)))


def cluster_bootstrap(statistic, arrays: Sequence[np.ndarray], clusters: Sequence | None = None, *, seed: int = 0,
                      n_resamples: int = BOOTSTRAP_RESAMPLES) -> np.ndarray:
    """`statistic(*arrays_resampled, axis=-1)` over `n_resamples` cluster-bootstrap resamples.

    The k clusters (`clusters[i]` labels point i; None: each point its own cluster) are numbered in
    order of first appearance; resample b draws k cluster numbers with replacement,
    `np.random.default_rng(seed).integers(0, k, size=(n_resamples, k))[b]`, and keeps every point of
    each drawn cluster, clusters in the order drawn, points in their order. Returns the statistic per
    resample (NaN where it does not exist)."""
    n = len(arrays[0])
    labels = list(range(n)) if clusters is None else list(clusters)
    order = list(dict.fromkeys(labels))
    members = [np.asarray([i for i, c in enumerate(labels) if c == lab], dtype=np.int64) for lab in order]
    k = len(members)
    draws = np.random.default_rng(seed).integers(0, k, size=(n_resamples, k))
    sizes = np.asarray([len(m) for m in members])
    out = np.full(n_resamples, np.nan)
    if len(set(sizes.tolist())) == 1:  # every cluster the same size: one array of indices
        idx = np.stack(members)[draws].reshape(n_resamples, -1)
        out[:] = statistic(*(a[idx] for a in arrays), axis=-1)
        return out
    lengths = sizes[draws].sum(axis=1)
    for length in np.unique(lengths):
        rows = np.flatnonzero(lengths == length)
        idx = np.stack([np.concatenate([members[c] for c in draws[r]]) for r in rows])
        out[rows] = statistic(*(a[idx] for a in arrays), axis=-1)
    return out


def _interval(rhos: np.ndarray, confidence: float) -> tuple[list[float] | None, int]:
    finite = rhos[np.isfinite(rhos)]
    if not len(finite):
        return None, int(len(rhos))
    lo, hi = np.quantile(finite, [0.5 - confidence / 2, 0.5 + confidence / 2])
    return [float(lo), float(hi)], int(len(rhos) - len(finite))


def _correlation(kind: str, columns: tuple, clusters, seed: int, n_resamples: int, confidence: float) -> dict:
    """Spearman (columns x, y) or partial Spearman (x, y, z): see `spearman` and `partial_spearman`."""
    n_in = len(columns[0])
    if clusters is not None and len(clusters) != n_in:
        raise ValueError(f"{kind}: {len(clusters)} cluster labels for {n_in} points")
    keep = [i for i in range(n_in) if _exists(*(c[i] for c in columns))]
    cols = tuple(np.asarray([float(c[i]) for i in keep], dtype=np.float64) for c in columns)
    labels = None if clusters is None else [clusters[i] for i in keep]
    n = len(keep)
    k = n if labels is None else len(set(labels))
    out = {"n": n, "clusters": k, "rho": None, "p_value": None, "p_method": None, "ci": None,
           "ci_method": (POINT_BOOTSTRAP if labels is None else CLUSTER_BOOTSTRAP) if n_resamples else None,
           "seed": seed, "resamples": n_resamples, "degenerate_resamples": None, "reason": None}
    if n < MIN_POINTS:
        out["reason"] = f"{n} point{'s' * (n != 1)}: a rank correlation needs at least {MIN_POINTS}"
        return out
    if any(np.all(c == c[0]) for c in cols[:2]):
        out["reason"] = "a constant variable has no rank correlation"
        return out
    rho = float(_spearman_rows(*cols) if kind == "spearman" else _partial_rows(*cols))
    a, b = _ranks(cols[0]), _ranks(cols[1])
    if not math.isfinite(rho):
        out["reason"] = "no variation left once the control is taken out" if kind == "partial" else \
            "a constant variable has no rank correlation"
        return out
    out["rho"] = rho
    if kind == "spearman" and n < EXACT_BELOW:
        out["p_value"], out["p_method"] = exact_permutation_p(a, b), EXACT_P
    elif abs(rho) > 1 - 1e-12:  # t = ±∞: the approximation gives p = 0, which no test supports
        out["reason"] = "|ρ| = 1: the t approximation has no p-value here"
    elif kind == "spearman":
        out["p_value"], out["p_method"] = _finite(stats.spearmanr(cols[0], cols[1]).pvalue), SPEARMAN_P
    else:  # residuals are not exchangeable: no exact permutation test; the interval is what to read
        df = n - 3
        t = rho * math.sqrt(df / max(1.0 - rho * rho, 1e-300))
        out["p_value"], out["p_method"] = _finite(2 * stats.t.sf(abs(t), df)), PARTIAL_P
    if not n_resamples:
        return out
    if k < MIN_CLUSTERS:
        why = (f"{k} cluster{'s' * (k != 1)}: a bootstrap interval needs at least {MIN_CLUSTERS} "
               f"(with k there are only C(2k−1, k) distinct resamples)")
        out["reason"] = f"{out['reason']}; {why}" if out["reason"] else why
        return out
    rows = _spearman_rows if kind == "spearman" else _partial_rows
    rhos = cluster_bootstrap(rows, cols, labels, seed=seed, n_resamples=n_resamples)
    out["ci"], out["degenerate_resamples"] = _interval(rhos, confidence)
    return out


def spearman(x: Sequence, y: Sequence, *, clusters: Sequence | None = None, seed: int = 0,
             n_resamples: int = BOOTSTRAP_RESAMPLES, confidence: float = CONFIDENCE) -> dict:
    """Spearman's rank correlation of the points (x_i, y_i) where both exist, its two-sided p-value and
    a seeded percentile bootstrap interval.

    {"n", "clusters", "rho", "p_value", "p_method", "ci", "ci_method", "seed", "resamples",
    "degenerate_resamples", "reason"}. With fewer than MIN_POINTS (5) points or a constant variable
    there is no ρ (nor anything that follows from it) and "reason" says why. p: below EXACT_BELOW (10)
    points the exact permutation test (`exact_permutation_p`), else scipy.stats.spearmanr. The
    interval resamples `clusters` (e.g. one label per strategy: points of one cluster are not
    independent) with `cluster_bootstrap`, or the points themselves without labels; it is the
    (1 ∓ c)/2 quantiles of ρ over the resamples, leaving out those in which ρ does not exist
    (counted in "degenerate_resamples"); none with fewer than MIN_CLUSTERS (5) clusters, "reason"
    then saying so. n_resamples = 0: no interval."""
    if len(x) != len(y):
        raise ValueError(f"spearman: {len(x)} values against {len(y)}; the pairs must align")
    return _correlation("spearman", (list(x), list(y)), clusters, seed, n_resamples, confidence)


def partial_spearman(x: Sequence, y: Sequence, z: Sequence, *, clusters: Sequence | None = None, seed: int = 0,
                     n_resamples: int = BOOTSTRAP_RESAMPLES, confidence: float = CONFIDENCE) -> dict:
    """The partial Spearman correlation of x and y controlling for z over the points where all three
    exist: the ranks of x and of y are each residualised (least squares with intercept) on the ranks
    of z, and ρ is the Pearson correlation of the two residuals. Same dict, rules and interval as
    `spearman`; p: a t-test on n − 3 degrees of freedom (pingouin's and R ppcor's; approximate, as
    residuals are not exchangeable, so no exact permutation test exists for it)."""
    if len({len(x), len(y), len(z)}) != 1:
        raise ValueError(f"partial_spearman: {len(x)}, {len(y)} and {len(z)} values; the points must align")
    return _correlation("partial", (list(x), list(y), list(z)), clusters, seed, n_resamples, confidence)
