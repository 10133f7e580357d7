"""Temporal precedence along fine traces: does a geometry measure's rise come before an old probe
set's R@1 fall, and does it forecast the fall better than R@1's own history (docs/definitions.md,
"Lead/lag and forecast")?

Series are values at consecutive traces (index t = 0, 1, …, equally spaced in steps); lags and
horizons are counted in traces.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from .checks import check_rows

LAG_TIE = 1e-12  # correlations closer than this are a tie (broken towards the smallest |lag|)
MIN_PAIRS = 3    # fewer overlapping differences at a lag: no correlation (two points always give ±1)
FORECAST_MODEL = ("ordinary least squares (numpy.linalg.lstsq) of R@1 at t + k on an intercept and the "
                  "last p values of R@1 (baseline), plus the last p values of each geometry measure")


def _series(what: str, name: str, x) -> np.ndarray:
    check_rows(what, **{name: x})
    return np.asarray(x, dtype=np.float64)


def lead_lag(geometry: Sequence[float], r1: Sequence[float], *, max_lag: int, min_pairs: int = MIN_PAIRS) -> dict:
    """The lag at which a geometry measure's rise best leads R@1's fall, for one series of traces.

    rise_t = g_{t+1} − g_t, fall_t = −(r_{t+1} − r_t) (positive when R@1 drops), and for each lag
    ℓ ∈ [−max_lag, max_lag] c(ℓ) = Pearson's r of the pairs (rise_t, fall_{t+ℓ}) over every t where
    both exist. ℓ > 0: the geometry moved ℓ traces before R@1 (geometry leads); ℓ < 0: R@1 moved
    first. c(ℓ) is None with fewer than `min_pairs` pairs or a constant side.

    Returns {"lag": ℓ* = argmax c(ℓ) (ties within LAG_TIE: the smallest |ℓ|, then the negative one;
    None when no c exists), "correlation": c(ℓ*), "lags", "correlations", "pairs" (per lag)}.
    The correlation is signed: for a measure whose disorder shows as a fall (the rigid share), pass
    its negative. NaN or inf raise ValueError naming the series."""
    # Imported here: inference imports scipy.stats (about a second), and every training process
    # imports geomlab.geometry.
    from .inference import _pearson_centred

    g, r = _series("lead_lag", "geometry", geometry), _series("lead_lag", "r1", r1)
    if g.shape != r.shape or g.ndim != 1:
        raise ValueError(f"lead_lag: geometry {g.shape} and r1 {r.shape} must be 1-D series of equal length")
    if max_lag < 0:
        raise ValueError(f"lead_lag: max_lag must be at least 0, got {max_lag}")
    rise, fall = np.diff(g), -np.diff(r)
    n = len(rise)
    lags = list(range(-max_lag, max_lag + 1))
    correlations, pairs = [], []
    for lag in lags:
        overlap = max(0, n - abs(lag))  # t and t + ℓ both in [0, n)
        a, b = rise[max(0, -lag):][:overlap], fall[max(0, lag):][:overlap]
        pairs.append(int(len(a)))
        c = float(_pearson_centred(a - a.mean(), b - b.mean())) if len(a) >= max(min_pairs, 2) else math.nan
        correlations.append(c if math.isfinite(c) else None)
    best = None
    for lag, c in sorted(zip(lags, correlations), key=lambda lc: (abs(lc[0]), lc[0])):
        if c is not None and (best is None or c > best[1] + LAG_TIE):
            best = (lag, c)
    return {"lag": None if best is None else best[0], "correlation": None if best is None else best[1],
            "lags": lags, "correlations": correlations, "pairs": pairs}


def _windows(r: np.ndarray, g: np.ndarray, horizon: int, history: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(baseline features, features with geometry, targets) of one series: for each t with a full
    history and a target, [1, r_t, …, r_{t−p+1}] (+ [g_t, …, g_{t−p+1}] per measure) → r_{t+k}."""
    ts = range(history - 1, len(r) - horizon)
    base = np.asarray([[1.0, *r[t - history + 1:t + 1][::-1]] for t in ts]).reshape(len(ts), history + 1)
    geo = np.asarray([g[t - history + 1:t + 1][::-1].T.ravel() for t in ts]).reshape(len(ts), history * g.shape[1])
    return base, np.hstack([base, geo]), np.asarray([r[t + horizon] for t in ts])


def _rmse(x_train, y_train, x_test, y_test) -> float:
    coef = np.linalg.lstsq(x_train, y_train, rcond=None)[0]
    return float(np.sqrt(np.mean((x_test @ coef - y_test) ** 2)))


def forecast_errors(r1: Sequence[Sequence[float]], geometry: Sequence, seeds: Sequence, *, horizon: int,
                    history: int = 3) -> dict:
    """Does the geometry measured so far forecast R@1 `horizon` traces ahead better than R@1's own
    history? Leave-one-seed-out errors of two least-squares models (FORECAST_MODEL).

    `r1[i]`: one series of R@1 along the traces; `geometry[i]`: the geometry of the same traces, [T]
    or [T, m] for m measures; `seeds[i]`: its seed (several series may share one, e.g. several old
    probe sets). For each seed s, both models are fitted on the windows of every other seed and scored
    on s's: the root mean squared error of the forecast r̂_{t+k} over s's windows.

    Returns {"horizon", "history", "model", "seeds" (in order of first appearance), "windows" (per
    seed), "error_history", "error_geometry" (per seed; None where s has no window or the other seeds
    none), "history_error", "geometry_error" (`mean_ci` over seeds), "difference"
    (`paired_comparison` of geometry against history: negative when geometry forecasts better)}.
    NaN or inf raise ValueError naming the series."""
    from .inference import mean_ci, paired_comparison  # imported here: see lead_lag

    if not len(r1) == len(geometry) == len(seeds):
        raise ValueError(f"forecast_errors: {len(r1)} r1 series, {len(geometry)} geometry series, {len(seeds)} seeds")
    if horizon < 1 or history < 1:
        raise ValueError(f"forecast_errors: horizon and history must be at least 1, got {horizon} and {history}")
    per_series = []
    for i, (r, g) in enumerate(zip(r1, geometry)):
        r, g = _series("forecast_errors", f"r1[{i}]", r), _series("forecast_errors", f"geometry[{i}]", g)
        g = g.reshape(len(g), -1)
        if r.ndim != 1 or len(g) != len(r):
            raise ValueError(f"forecast_errors: r1[{i}] {r.shape} and geometry[{i}] {g.shape} "
                             "must have one row per trace")
        per_series.append(_windows(r, g, horizon, history))
    order = list(dict.fromkeys(seeds))
    windows, err_history, err_geometry = [], [], []
    for s in order:
        held = [w for w, seed in zip(per_series, seeds) if seed == s]
        rest = [w for w, seed in zip(per_series, seeds) if seed != s]
        test = [np.concatenate(part) for part in zip(*held)]
        train = [np.concatenate(part) for part in zip(*rest)] if rest else None
        windows.append(int(len(test[2])))
        if train is None or not len(train[2]) or not len(test[2]):
            err_history.append(None)
            err_geometry.append(None)
            continue
        err_history.append(_rmse(train[0], train[2], test[0], test[2]))
        err_geometry.append(_rmse(train[1], train[2], test[1], test[2]))
    return {"horizon": horizon, "history": history, "model": FORECAST_MODEL, "seeds": order, "windows": windows,
            "error_history": err_history, "error_geometry": err_geometry,
            "history_error": mean_ci(err_history), "geometry_error": mean_ci(err_geometry),
            "difference": paired_comparison(err_geometry, err_history)}
