"""Realignment, recovered share, lead/lag and the forecast test (docs/definitions.md, "Realignment
and recovered share" and "Lead/lag and forecast") against ground truth built by hand: copies of a
base model's embeddings turned, projected or blurred in known ways, and synthetic series with a known
lag. Checked against independent computations (scipy's Procrustes, a brute-force R@1 by argmax,
ridge in closed form with a brute-force leave-one-out, scikit-learn's least squares)."""
import math

import numpy as np
import pytest
import scipy.linalg
import scipy.stats
import torch
import torch.nn.functional as F
from sklearn.linear_model import LinearRegression

from geomlab import geometry as G
from geomlab.geometry.realign import REALIGNMENTS, RIDGE_GRID

DIM = 16
PAIRING_DIMS = 8  # the base's image and text share these coordinates; the other 8 are unrelated per modality


def gaussian(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# A random basis of the embedding space: its last PAIRING_DIMS rows span the directions that carry
# the pairing, the first ones directions in which image and text are independent.
BASIS = torch.from_numpy(scipy.stats.ortho_group.rvs(DIM, random_state=0))
PAIRING = BASIS[DIM - PAIRING_DIMS:]


def base_model(n, seed, captions=1):
    """(image, text) of n images as a base model embeds them: unit rows that agree on the pairing
    directions (up to noise) and not on the rest, so retrieval is good but not perfect and a fitted
    map can gain by weighting the pairing directions (the adaptation the reference accounts for).
    With several `captions` per image, (image, text, caption_image), caption c describing image
    c // captions."""
    shared = gaussian((n, PAIRING_DIMS), seed)
    image = torch.cat([gaussian((n, DIM - PAIRING_DIMS), seed + 1), shared], 1)
    m = n * captions
    own = shared.repeat_interleave(captions, 0) + 0.3 * gaussian((m, PAIRING_DIMS), seed + 3)
    text = torch.cat([gaussian((m, DIM - PAIRING_DIMS), seed + 2), own], 1)
    pair = (F.normalize(image @ BASIS, dim=1), F.normalize(text @ BASIS, dim=1))
    return pair if captions == 1 else (*pair, torch.arange(n).repeat_interleave(captions))


BASE_PROBE = base_model(200, 10)
BASE_CAL = base_model(600, 20)


@pytest.fixture(scope="module")
def reference():
    """The base's own realigned R@1, shared by every realignment below (as the analyser shares it
    between the checkpoints of a run)."""
    return G.realigned_r1(BASE_PROBE, BASE_CAL, BASE_CAL)


def copy_with(transform_image, transform_text):
    """(probe, calibration) of a checkpoint whose embeddings are the base's, transformed."""
    return tuple((transform_image(u), transform_text(v)) for u, v in (BASE_PROBE, BASE_CAL))


def brute_r1(image, text, caption_image=None):
    """½ (image→text + text→image) R@1 by argmax of the float64 scores (random data: no ties); an
    image is a hit when its best-scoring caption is one of its own."""
    s = image @ text.T
    ci = torch.arange(text.shape[0]) if caption_image is None else caption_image
    image_to_text = (ci[s.argmax(1)] == torch.arange(image.shape[0])).double().mean()
    text_to_image = (s.argmax(0) == ci).double().mean()
    return 0.5 * (float(image_to_text) + float(text_to_image))


def test_reference_is_the_base_under_each_map(reference):
    # independent computations: scipy's Procrustes, the identity for the base against itself, ridge in
    # closed form at the chosen penalty, each scored by argmax
    (u, v), (u_cal, v_cal) = BASE_PROBE, BASE_CAL
    q, _ = scipy.linalg.orthogonal_procrustes(v_cal.numpy(), u_cal.numpy())
    alpha = reference["alpha"]
    w = torch.linalg.solve(v_cal.T @ v_cal + alpha * torch.eye(DIM, dtype=torch.float64), v_cal.T @ u_cal)
    assert reference["now"] == pytest.approx(brute_r1(u, v), abs=1e-12)
    assert reference["cross_orthogonal"] == pytest.approx(brute_r1(u, v @ torch.from_numpy(q)), abs=1e-12)
    assert reference["modality_orthogonal"] == pytest.approx(brute_r1(u, v), abs=1e-12)
    assert reference["cross_linear"] == pytest.approx(brute_r1(u, F.normalize(v @ w, dim=1)), abs=1e-12)
    # the ridge weights the pairing directions: on this base the linear map gains, which is why a
    # checkpoint is compared with the base under the same map, not with the base as it is
    assert reference["cross_linear"] > reference["now"]


def test_ridge_penalty_is_the_leave_one_out_best():
    """The α cross_linear_map picks minimises the leave-one-out squared error, refitted pair by pair."""
    u, v = (x[:120] for x in BASE_CAL)
    w, alpha = G.cross_linear_map(u, v)
    candidates = [k * v.shape[0] / DIM for k in RIDGE_GRID]

    def loo_error(a):
        err = 0.0
        for i in range(v.shape[0]):
            keep = torch.arange(v.shape[0]) != i
            wi = torch.linalg.solve(v[keep].T @ v[keep] + a * torch.eye(DIM, dtype=torch.float64), v[keep].T @ u[keep])
            err += float(((v[i] @ wi - u[i]) ** 2).sum())
        return err

    errors = [loo_error(a) for a in candidates]
    assert alpha == pytest.approx(candidates[int(np.argmin(errors))], rel=1e-12)
    closed = torch.linalg.solve(v.T @ v + alpha * torch.eye(DIM, dtype=torch.float64), v.T @ u)
    assert torch.allclose(w, closed, atol=1e-10)


def test_rotated_text_is_recovered_in_full(reference):
    rotation = torch.from_numpy(scipy.stats.ortho_group.rvs(DIM, random_state=1))
    probe, cal = copy_with(lambda u: u, lambda v: v @ rotation)
    out = G.realignment(probe, cal, BASE_PROBE, BASE_CAL, reference=reference)
    assert out["now"] < out["base"] / 2  # the turn broke retrieval: there is a loss to recover
    # Procrustes undoes the turn exactly; ridge is unchanged by a rotation of its input, and the
    # per-modality fit turns the text back onto the base's
    for name in REALIGNMENTS:
        assert out[name]["share"] == pytest.approx(1.0, abs=1e-6), name
        assert out[name]["realigned"] == pytest.approx(out[name]["reference"], abs=1e-12), name
    q, _ = scipy.linalg.orthogonal_procrustes(cal[1].numpy(), cal[0].numpy())
    turned_back = probe[1] @ torch.from_numpy(q)
    assert out["cross_orthogonal"]["realigned"] == pytest.approx(brute_r1(probe[0], turned_back), abs=1e-12)


def test_several_captions_per_image():
    # two captions per image: every caption is paired with its image in the fits and the scoring
    probe, cal = base_model(100, 30, captions=2), base_model(300, 40, captions=2)
    rotation = torch.from_numpy(scipy.stats.ortho_group.rvs(DIM, random_state=5))
    turned = [(u, v @ rotation, ci) for u, v, ci in (probe, cal)]
    out = G.realignment(*turned, probe, cal)
    assert out["now"] < out["base"] / 2
    for name in REALIGNMENTS:
        assert out[name]["share"] == pytest.approx(1.0, abs=1e-6), name
    u_cal, v_cal, ci_cal = turned[1]
    q, _ = scipy.linalg.orthogonal_procrustes(v_cal.numpy(), u_cal[ci_cal].numpy())
    u, v, ci = turned[0]
    assert out["cross_orthogonal"]["realigned"] == pytest.approx(brute_r1(u, v @ torch.from_numpy(q), ci), abs=1e-12)
    assert out["base"] == pytest.approx(brute_r1(*probe), abs=1e-12)


def test_modality_fit_returns_the_rotation():
    rotation = torch.from_numpy(scipy.stats.ortho_group.rvs(DIM, random_state=2))
    u_cal, v_cal = BASE_CAL
    r_image, r_text = G.modality_orthogonal_maps((u_cal, v_cal @ rotation), BASE_CAL)
    assert torch.allclose(r_image, torch.eye(DIM, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(r_text, rotation.T, atol=1e-10)  # the map back to the base undoes the turn
    q = G.cross_orthogonal_map(u_cal, v_cal @ rotation)
    q_scipy, _ = scipy.linalg.orthogonal_procrustes((v_cal @ rotation).numpy(), u_cal.numpy())
    assert torch.allclose(q, torch.from_numpy(q_scipy), atol=1e-10)


def test_projection_of_the_pairing_directions_is_not_recovered(reference):
    # project the text off the pairing directions: what is left is independent of the images, so no
    # map of it, fitted on anything, can pair them better than chance
    lose = torch.eye(DIM, dtype=torch.float64) - PAIRING.T @ PAIRING
    probe, cal = copy_with(lambda u: u, lambda v: F.normalize(v @ lose, dim=1))
    out = G.realignment(probe, cal, BASE_PROBE, BASE_CAL, reference=reference)
    n = probe[0].shape[0]
    # a random pairing of n queries hits about once per direction (Poisson(1): P(≥ 6) ≈ 6·10⁻⁴)
    chance_bound = 6 / n
    assert out["now"] <= chance_bound < out["base"]
    for name in REALIGNMENTS:
        assert out[name]["realigned"] <= chance_bound, name


def test_random_projection_stays_below_its_bound(reference):
    # a random rank-8 projection keeps part of the pairing directions: the lost ones stay lost, so no
    # realignment reaches the base under the same map (the share stays below 1)
    keep = torch.from_numpy(scipy.stats.ortho_group.rvs(DIM, random_state=3))[:, :DIM // 2]
    probe, cal = copy_with(lambda u: u, lambda v: F.normalize(v @ keep @ keep.T, dim=1))
    out = G.realignment(probe, cal, BASE_PROBE, BASE_CAL, reference=reference)
    assert out["now"] < out["base"]
    for name in REALIGNMENTS:
        assert out[name]["realigned"] < out[name]["reference"], name
        assert out[name]["share"] < 1, name
    # the linear map cannot leave the 8 dimensions the text still has
    w, _ = G.cross_linear_map(cal[0], cal[1])
    assert int(torch.linalg.matrix_rank(cal[1] @ w)) == DIM // 2


def test_noise_is_not_recovered(reference):
    # independent noise per sample and modality: nothing a map fitted on other samples can undo, so
    # each realignment ends below the base's own realigned R@1
    probe, cal = (tuple(F.normalize(x + 0.3 * gaussian(x.shape, 100 + 10 * k + m), dim=1) for m, x in enumerate(pair))
                  for k, pair in enumerate((BASE_PROBE, BASE_CAL)))
    out = G.realignment(probe, cal, BASE_PROBE, BASE_CAL, reference=reference)
    assert out["now"] < out["base"]
    for name in REALIGNMENTS:
        assert out[name]["realigned"] < out[name]["reference"], name
        assert out[name]["share"] < 1, name


def test_linear_map_recovers_a_distortion_a_rotation_cannot(reference):
    # text stretched along random axes (invertible): the ridge undoes most of it, no rotation can
    stretch = torch.from_numpy(scipy.stats.ortho_group.rvs(DIM, random_state=4))
    distort = stretch @ torch.diag(torch.logspace(-1, 1, DIM, dtype=torch.float64)) @ stretch.T
    probe, cal = copy_with(lambda u: u, lambda v: F.normalize(v @ distort, dim=1))
    out = G.realignment(probe, cal, BASE_PROBE, BASE_CAL, reference=reference)
    assert out["cross_linear"]["share"] > out["cross_orthogonal"]["share"]
    assert out["cross_linear"]["share"] > 0.8


def test_nothing_forgotten_has_no_share(reference):
    out = G.realignment(BASE_PROBE, BASE_CAL, BASE_PROBE, BASE_CAL, reference=reference)
    assert out["now"] == out["base"]
    assert all(out[name]["share"] is None for name in REALIGNMENTS)
    # better than the base: nothing forgotten; a reference at or below the checkpoint: nothing to
    # recover towards; a loss under min_loss: too small to share out
    assert G.recovered_share(0.5, now=0.6, reference=0.7, base=0.55) is None
    assert G.recovered_share(0.5, now=0.4, reference=0.4, base=0.6) is None
    assert G.recovered_share(0.5, now=0.4, reference=0.41, base=0.6, min_loss=0.02) is None
    # otherwise exact on the grid: 0.1 / 0.2 is exactly one half, not 0.49999…
    assert G.recovered_share(0.3, now=0.2, reference=0.4, base=0.4) == 0.5


def test_non_finite_input_is_refused_by_name():
    u_cal, v_cal = BASE_CAL
    bad = v_cal.clone()
    bad[3, 0] = float("nan")
    with pytest.raises(ValueError, match="calibration_text"):
        G.realignment(BASE_PROBE, (u_cal, bad), BASE_PROBE, BASE_CAL)
    with pytest.raises(ValueError, match="base_probe_image"):
        G.realignment(BASE_PROBE, BASE_CAL, (BASE_PROBE[0] * float("inf"), BASE_PROBE[1]), BASE_CAL)
    with pytest.raises(ValueError, match="reference"):
        G.recovered_share(0.3, now=0.2, reference=float("nan"), base=0.4)
    with pytest.raises(ValueError, match="r1"):
        G.lead_lag([0.0, 1.0, 2.0, 3.0], [0.5, float("nan"), 0.4, 0.3], max_lag=1)
    with pytest.raises(ValueError, match=r"geometry\[1\]"):
        G.forecast_errors([[0.5] * 8] * 2, [[0.0] * 8, [0.0] * 7 + [float("inf")]], [0, 1], horizon=1)


# ------------------------------------------------------------------------------ lead/lag


def led_series(lag, n=300, seed=0):
    """(geometry, r1): R@1 falls by the geometry's rise `lag` traces later, plus noise."""
    rng = np.random.default_rng(seed)
    rise = rng.standard_normal(n)
    fall = np.roll(rise, lag) + 0.5 * rng.standard_normal(n)
    return np.cumsum(rise), 0.8 - np.cumsum(fall)


@pytest.mark.parametrize("lag", [0, 3, -2])
def test_lead_lag_finds_a_known_lag(lag):
    geometry, r1 = led_series(lag, seed=lag + 5)
    out = G.lead_lag(geometry, r1, max_lag=6)
    assert out["lag"] == lag
    assert out["lags"] == list(range(-6, 7))
    # each correlation against numpy's, on the pairs (rise_t, fall_{t+ℓ}) written out one by one
    rise, fall = np.diff(geometry), -np.diff(r1)
    for ell, c, pairs in zip(out["lags"], out["correlations"], out["pairs"]):
        ts = [t for t in range(len(rise)) if 0 <= t + ell < len(fall)]
        assert pairs == len(ts)
        assert c == pytest.approx(np.corrcoef(rise[ts], fall[[t + ell for t in ts]])[0, 1], abs=1e-12)
    assert out["correlation"] == max(out["correlations"])


def test_lead_lag_undefined_and_ties():
    # constant geometry: no correlation at any lag, no lag
    out = G.lead_lag(np.ones(20), np.linspace(1, 0, 20) ** 2, max_lag=2)
    assert out["lag"] is None and out["correlations"] == [None] * 5
    # fewer than MIN_PAIRS overlapping differences at the far lags: those have none
    # (lags beyond the series have none at all)
    out = G.lead_lag([0.0, 1.0, 3.0, 2.0, 5.0], [1.0, 0.8, 0.9, 0.5, 0.6], max_lag=5)
    assert out["pairs"] == [0, 0, 1, 2, 3, 4, 3, 2, 1, 0, 0]
    assert [c is None for c in out["correlations"]] == [p < 3 for p in out["pairs"]]
    # a period-2 series correlates equally at every even lag: the tie goes to lag 0
    zigzag = np.cumsum(np.tile([1.0, -1.0], 10))
    out = G.lead_lag(zigzag, -zigzag, max_lag=4)
    assert out["lag"] == 0 and out["correlation"] == pytest.approx(1.0)


# ------------------------------------------------------------------------------ forecast


def decaying_r1(n, seed, geometry=None, horizon=2):
    """R@1 along n traces: a noisy decay, and with `geometry`, falls that follow its rises `horizon`
    traces later."""
    rng = np.random.default_rng(seed)
    fall = 0.002 + 0.01 * rng.standard_normal(n)
    if geometry is not None:
        fall[horizon:] += np.diff(geometry, prepend=geometry[0])[:-horizon]
    return 0.8 - np.cumsum(fall)


SEEDS = [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]  # two old probe sets per seed


def test_forecast_with_noise_geometry_matches_the_baseline():
    r1 = [decaying_r1(60, 10 + i) for i in range(len(SEEDS))]
    noise = [np.random.default_rng(50 + i).standard_normal(60) for i in range(len(SEEDS))]
    out = G.forecast_errors(r1, noise, SEEDS, horizon=2, history=3)
    assert out["seeds"] == [0, 1, 2, 3, 4] and out["windows"] == [2 * (60 - 3 + 1 - 2)] * 5
    hist, geo = np.asarray(out["error_history"]), np.asarray(out["error_geometry"])
    # three noise regressors on ~450 training windows cost about 3/450 of the squared error
    # (overfitting); within 5% per seed the errors are equal
    assert np.all(np.abs(geo - hist) <= 0.05 * hist)
    assert out["difference"]["n"] == 5 and out["history_error"]["mean"] == pytest.approx(hist.mean())


def test_forecast_with_leading_geometry_beats_the_baseline():
    # the geometry's rises (about 0.016 a trace) come back as R@1 falls two traces later, beside
    # R@1's own noise (0.01 a trace), which neither model can forecast
    geometry = [np.cumsum(np.abs(np.random.default_rng(70 + i).standard_normal(60))) * 0.02 for i in range(len(SEEDS))]
    r1 = [decaying_r1(60, 10 + i, g, horizon=2) for i, g in enumerate(geometry)]
    out = G.forecast_errors(r1, geometry, SEEDS, horizon=2, history=3)
    assert np.all(np.asarray(out["error_geometry"]) < 0.8 * np.asarray(out["error_history"]))
    assert out["difference"]["mean_difference"] < 0 and out["difference"]["ci"][1] < 0


def test_forecast_errors_match_scikit_learn():
    # seed 1 held out: both models refitted by scikit-learn on windows written out one by one
    geometry = [np.random.default_rng(90 + i).standard_normal((30, 2)) for i in range(6)]
    r1 = [decaying_r1(30, 20 + i) for i in range(6)]
    seeds = [0, 0, 1, 1, 2, 2]
    horizon, history = 3, 2
    out = G.forecast_errors(r1, geometry, seeds, horizon=horizon, history=history)

    def windows(series):
        xs_h, xs_g, ys = [], [], []
        for i in series:
            for t in range(history - 1, 30 - horizon):
                lags = [r1[i][t - j] for j in range(history)]
                xs_h.append(lags)
                xs_g.append(lags + [geometry[i][t - j, m] for m in range(2) for j in range(history)])
                ys.append(r1[i][t + horizon])
        return np.asarray(xs_h), np.asarray(xs_g), np.asarray(ys)

    train, test = windows([0, 1, 4, 5]), windows([2, 3])
    for k, key in ((0, "error_history"), (1, "error_geometry")):
        pred = LinearRegression().fit(train[k], train[2]).predict(test[k])
        assert out[key][1] == pytest.approx(math.sqrt(np.mean((pred - test[2]) ** 2)), rel=1e-9)


def test_forecast_with_one_seed_has_no_error():
    out = G.forecast_errors([decaying_r1(20, 1)], [np.zeros(20)], ["only"], horizon=1)
    assert out["error_history"] == [None] and out["error_geometry"] == [None]
    assert out["history_error"]["mean"] is None and out["difference"]["n"] == 0


def test_empty_embeddings_are_refused_naming_the_argument():
    empty, some = torch.zeros(0, 8), F.normalize(torch.randn(6, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    with pytest.raises(ValueError, match="calibration_image has no rows"):
        G.realigned_r1((some, some), (empty, empty), (some, some))
    with pytest.raises(ValueError, match="cross_linear_map: image has no rows"):
        G.cross_linear_map(empty, empty)
