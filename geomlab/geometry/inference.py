"""Statistics across seeds and runs (docs/definitions.md, "Statistics across seeds"): a mean with its
95% t-interval, a paired comparison with a paired t-test, and a Spearman correlation with a seeded
bootstrap interval. Each returns a JSON-ready dict; a number that does not exist is None, never 0.
"""
from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 9999
PAIRED_TEST = "paired t-test, two-sided (scipy.stats.ttest_rel)"
BOOTSTRAP_METHOD = "percentile bootstrap over points (scipy.stats.bootstrap, paired)"


def _finite(v) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def _values(values: Sequence) -> np.ndarray:
    """The values that exist (None and NaN dropped), as float64."""
    return np.asarray([float(v) for v in values if v is not None and math.isfinite(float(v))], dtype=np.float64)


def _pairs(measure: str, a: Sequence, b: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """The pairs (a_i, b_i) in which both values exist (None and NaN dropped), as two float64 arrays."""
    if len(a) != len(b):
        raise ValueError(f"{measure}: {len(a)} values against {len(b)}; the pairs must align")
    keep = [(float(x), float(y)) for x, y in zip(a, b) if x is not None and y is not None
            and math.isfinite(float(x)) and math.isfinite(float(y))]
    return (np.asarray([k[0] for k in keep], dtype=np.float64),
            np.asarray([k[1] for k in keep], dtype=np.float64))


def t_interval(x: np.ndarray, confidence: float = CONFIDENCE) -> list[float] | None:
    """mean ± t_{(1+c)/2, n−1} · s / √n (s: the sample standard deviation); None for n < 2."""
    n = len(x)
    if n < 2:
        return None
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * x.std(ddof=1) / math.sqrt(n)
    m = x.mean()
    return [float(m - half), float(m + half)]


def mean_ci(values: Sequence, confidence: float = CONFIDENCE) -> dict:
    """{"n", "mean", "sd", "ci": [lo, hi] or None}: the mean of the values that exist and its
    t-interval; "ci" and "sd" are None with fewer than two values, "mean" None with none."""
    x = _values(values)
    return {"n": int(len(x)), "mean": float(x.mean()) if len(x) else None,
            "sd": float(x.std(ddof=1)) if len(x) > 1 else None, "ci": t_interval(x, confidence)}


def paired_comparison(a: Sequence, b: Sequence, confidence: float = CONFIDENCE) -> dict:
    """a against b on the same units (seeds): the differences a_i − b_i over the units where both
    exist, their mean, its t-interval and the paired t-test's two-sided p-value (H0: mean difference
    0). {"n", "mean_difference", "ci", "p_value", "test"}; "ci" and "p_value" are None with fewer than
    two pairs, and "p_value" also when every difference is exactly 0 (the test is undefined)."""
    x, y = _pairs("paired_comparison", a, b)
    d = x - y
    p = None
    if len(d) > 1 and np.any(d != 0):
        with warnings.catch_warnings():  # near-constant differences: scipy warns, and its p (≈ 0) is right
            warnings.filterwarnings("ignore", "Precision loss occurred", RuntimeWarning)
            p = _finite(stats.ttest_rel(x, y).pvalue)
    return {"n": int(len(d)), "mean_difference": float(d.mean()) if len(d) else None,
            "ci": t_interval(d, confidence), "p_value": p, "test": PAIRED_TEST}


def _spearman_rows(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    """Spearman's ρ along `axis` (Pearson correlation of average ranks); NaN where a row is constant."""
    rx, ry = stats.rankdata(x, axis=axis), stats.rankdata(y, axis=axis)
    rx = rx - rx.mean(axis=axis, keepdims=True)
    ry = ry - ry.mean(axis=axis, keepdims=True)
    den = np.sqrt((rx * rx).sum(axis=axis) * (ry * ry).sum(axis=axis))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (rx * ry).sum(axis=axis) / den


def spearman(x: Sequence, y: Sequence, *, seed: int = 0, n_resamples: int = BOOTSTRAP_RESAMPLES,
             confidence: float = CONFIDENCE) -> dict:
    """Spearman's rank correlation of the points (x_i, y_i) where both exist, its p-value
    (scipy.stats.spearmanr, two-sided) and a percentile bootstrap interval over points, seeded.

    {"n", "rho", "p_value", "ci", "method", "seed", "resamples", "degenerate_resamples"}. "rho" (and
    all that follows from it) is None with fewer than three points or a constant variable. The
    interval is the (1 ∓ c)/2 quantiles of ρ over the resamples; a resample in which x or y is
    constant has no ρ and is left out (counted in "degenerate_resamples")."""
    xs, ys = _pairs("spearman", x, y)
    out = {"n": int(len(xs)), "rho": None, "p_value": None, "ci": None, "method": BOOTSTRAP_METHOD,
           "seed": seed, "resamples": n_resamples, "degenerate_resamples": None}
    if len(xs) < 3 or np.all(xs == xs[0]) or np.all(ys == ys[0]):
        return out
    res = stats.spearmanr(xs, ys)
    out["rho"], out["p_value"] = _finite(res.statistic), _finite(res.pvalue)
    with warnings.catch_warnings():  # resamples with a constant variable are left out below
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        # random_state (not rng): the name every scipy since 1.10 accepts
        boot = stats.bootstrap((xs, ys), _spearman_rows, paired=True, vectorized=True, n_resamples=n_resamples,
                               confidence_level=confidence, method="percentile",
                               random_state=np.random.default_rng(seed))
    rhos = np.asarray(boot.bootstrap_distribution, dtype=np.float64)
    finite = rhos[np.isfinite(rhos)]
    out["degenerate_resamples"] = int(len(rhos) - len(finite))
    if len(finite):
        lo, hi = np.quantile(finite, [0.5 - confidence / 2, 0.5 + confidence / 2])
        out["ci"] = [float(lo), float(hi)]
    return out
