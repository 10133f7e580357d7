"""geomlab.geometry against independent computations and cases with known answers (docs/definitions.md)."""
import math

import numpy as np
import pytest
import scipy.linalg
import scipy.stats
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from geomlab import geometry as G
from geomlab import kernels
from geomlab.geometry.stats import summarize
from geomlab.traces import DomainEmbeddings


def numpy_eigen_angles(rotation) -> np.ndarray:
    """|angle| of the complex eigenvalues of `rotation` (numpy.linalg.eigvals), degrees, descending."""
    w = np.linalg.eigvals(np.asarray(rotation, dtype=np.float64))
    return np.sort(np.abs(np.angle(w, deg=True)))[::-1]


def degrees_between(a, b):
    """Row-wise angle in degrees between a_i and b_i, by arccos of the cosine."""
    cos = (F.normalize(a, dim=1) * F.normalize(b, dim=1)).sum(1).clamp(-1, 1)
    return torch.rad2deg(torch.arccos(cos))


def brute_ranks(img, txt, caption_image):
    """0-based ranks of the positives by counting higher scores (random floats: no ties).
    image→text counts each image's best-ranked caption."""
    s = img @ txt.T
    cols = torch.arange(txt.shape[0])
    t2i = (s.T > s[caption_image, cols].unsqueeze(1)).sum(1)
    caption_rank = (s[caption_image] > s[caption_image, cols].unsqueeze(1)).sum(1)
    i2t = torch.stack([caption_rank[caption_image == i].min() for i in range(img.shape[0])])
    return i2t, t2i


def pairwise_auc(labels, scores):
    """P(score of a positive > score of a negative) + ½ P(equal), over every positive-negative pair."""
    labels, scores = np.asarray(labels, bool), np.asarray(scores, float)
    diff = scores[labels][:, None] - scores[~labels][None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


def unit(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)


def random_orthogonal(d, seed=0):
    return torch.from_numpy(scipy.stats.ortho_group.rvs(d, random_state=seed))


def perturb(x, scale, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(x + scale * torch.randn(x.shape, generator=g, dtype=x.dtype), dim=1)


def paired(n=300, d=16, seed=0):
    """Image/text embeddings whose pairs are close (retrieval mostly right)."""
    img = unit(n, d, seed)
    return img, perturb(img, 0.3, seed + 1)


def test_rotation_angles_match_arccos():
    a, b = unit(50, 8, 1), unit(50, 8, 2)
    ref = torch.rad2deg(torch.arccos((a * b).sum(1).clamp(-1, 1)))
    assert torch.allclose(G.rotation_angles(a, b), ref, atol=1e-9)
    assert torch.equal(G.rotation_angles(a, a), torch.zeros(50, dtype=torch.float64))


def test_procrustes_matches_scipy_and_spectrum_matches_eig():
    a = unit(200, 12, 3)
    b = perturb(a @ random_orthogonal(12, 4), 0.2, 5)
    res = G.procrustes(a, b)
    r_ref, _ = scipy.linalg.orthogonal_procrustes(a.numpy(), b.numpy())
    assert np.allclose(res.rotation.numpy(), r_ref, atol=1e-8)
    assert np.allclose(res.spectrum.numpy(), numpy_eigen_angles(r_ref), atol=1e-5)
    num = np.linalg.norm(a.numpy() @ r_ref - b.numpy()) ** 2
    den = np.linalg.norm(a.numpy() - b.numpy()) ** 2
    assert res.rigid_share == pytest.approx(1 - num / den, abs=1e-9)
    assert 0.5 < res.rigid_share < 1.0
    ref_res = np.degrees(np.arccos(np.clip((F.normalize(a @ torch.from_numpy(r_ref), dim=1) * b).sum(1).numpy(), -1, 1)))
    assert np.allclose(res.residual_angles.numpy(), ref_res, atol=1e-5)


def test_linear_cka_matches_dense_hsic():
    x, y = unit(120, 10, 6), unit(120, 7, 7) + 0.5
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    k, l_ = x @ x.T, y @ y.T

    def hsic(p, q):
        return torch.trace(p @ h @ q @ h)

    ref = hsic(k, l_) / torch.sqrt(hsic(k, k) * hsic(l_, l_))
    assert G.linear_cka(x, y) == pytest.approx(float(ref), abs=1e-10)
    assert G.linear_cka(x, x) == pytest.approx(1.0)


def test_mutual_knn_matches_brute_force():
    x = unit(150, 6, 8)
    y = perturb(x, 0.3, 9)
    k = 10

    def nn(z):
        s = z @ z.T
        s.fill_diagonal_(-math.inf)
        return [set(r.tolist()) for r in torch.topk(s, k, dim=1).indices]

    ref = np.mean([len(p & q) / k for p, q in zip(nn(x), nn(y))])
    assert G.mutual_knn(x, y, k, tile=32) == pytest.approx(ref, abs=1e-12)
    assert G.mutual_knn(x, x, k) == pytest.approx(1.0)


def dense_drift(a, b):
    """|SAM_b − SAM_a| over pairs i < j, from the full self-angle matrices."""
    def sam(z):
        return torch.rad2deg(torch.arccos((z @ z.T).clamp(-1, 1)))

    iu = torch.triu_indices(a.shape[0], a.shape[0], 1)
    return (sam(b) - sam(a)).abs()[iu[0], iu[1]]


@pytest.mark.parametrize("tile, workers", [(7, 1), (7, 3), (64, 2)])
def test_topology_drift_matches_dense(tile, workers):
    a = unit(90, 5, 10)
    b = perturb(a, 0.2, 11)
    vals = dense_drift(a, b)
    out = G.topology_drift(a, b, tile=tile, workers=workers)
    assert out["exact"] and out["pairs"] == vals.numel()
    assert out["mean"] == pytest.approx(float(vals.mean()), rel=1e-4)
    assert out["max"] == pytest.approx(float(vals.max()), rel=1e-4)
    # quantiles are read at the centre of 0.01° bins: within one bin of numpy's
    assert abs(out["median"] - float(np.quantile(vals.numpy(), 0.5))) <= 0.011
    assert abs(out["p90"] - float(np.quantile(vals.numpy(), 0.9))) <= 0.011


def test_topology_drift_sampled_above_exact_limit():
    a = unit(90, 5, 10)
    b = perturb(a, 0.2, 11)
    vals = dense_drift(a, b)
    sampled = G.topology_drift(a, b, exact_limit=10, sample_pairs=1)
    assert not sampled["exact"] and sampled["pairs"] == 10**7  # at least 10⁷ pairs are drawn
    # 10⁷ uniform draws over the 90·89 ordered pairs: the pair statistics up to sampling noise
    assert sampled["mean"] == pytest.approx(float(vals.mean()), rel=0.01)
    assert sampled["max"] == pytest.approx(float(vals.max()), rel=1e-4)  # every pair is drawn
    assert sampled["median"] == pytest.approx(float(np.quantile(vals.numpy(), 0.5)), rel=0.02)
    assert sampled["p90"] == pytest.approx(float(np.quantile(vals.numpy(), 0.9)), rel=0.02)


def test_retrieval_metrics_match_brute_force_ranks():
    img, txt = paired(80, 8, 12)
    ref_i2t, ref_t2i = brute_ranks(img, txt, torch.arange(80))
    m = G.retrieval_metrics(img.float(), txt.float())
    for direction, ranks in (("image_to_text", ref_i2t.numpy()), ("text_to_image", ref_t2i.numpy())):
        for k in (1, 5, 10):
            assert m[f"{direction}_R@{k}"] == pytest.approx(float((ranks < k).mean()))
        assert m[f"{direction}_mean_rank"] == pytest.approx(float(ranks.mean()) + 1)
        assert m[f"{direction}_median_rank"] == np.floor(np.median(ranks)) + 1


def test_flips_auc_matches_sklearn():
    img_a, txt_a = paired(300, 16, 13)
    img_b, txt_b = perturb(img_a, 0.25, 14), perturb(txt_a, 0.25, 15)
    fl = G.flips(img_a, txt_a, img_b, txt_b)
    dev = G.inter_modal_deviation(img_a, txt_a, img_b, txt_b)
    s_a, s_b = img_a @ txt_a.T, img_b @ txt_b.T
    ca = s_a.argmax(1) == torch.arange(300)
    cb = s_b.argmax(1) == torch.arange(300)
    forgotten = (ca & ~cb)[ca].numpy()
    assert 0 < forgotten.sum() < len(forgotten)
    f = fl["image_to_text"]
    assert f["correct_a"] == int(ca.sum()) and f["correct_b"] == int(cb.sum())
    assert f["forgotten"] == pytest.approx(forgotten.mean())
    assert f["learned"] == pytest.approx(float((~ca & cb).sum()) / float((~ca).sum()))
    assert torch.equal(f["forgotten_mask"], ca & ~cb) and torch.equal(f["learned_mask"], ~ca & cb)
    assert f["auc_alignment_drift"] == pytest.approx(roc_auc_score(forgotten, dev["alignment_drift"][ca].numpy()))
    assert f["auc_mismatch"] == pytest.approx(roc_auc_score(forgotten, dev["mismatch"][ca].numpy()))


def test_roc_auc_matches_pair_counting_with_ties():
    g = torch.Generator().manual_seed(27)
    labels = torch.rand(400, generator=g) < 0.3
    scores = torch.randint(0, 20, (400,), generator=g).double() + labels.double() * 3  # many ties
    assert G.roc_auc(labels, scores) == pytest.approx(pairwise_auc(labels.numpy(), scores.numpy()), abs=1e-12)
    assert G.roc_auc(labels, -scores) == pytest.approx(1 - pairwise_auc(labels.numpy(), scores.numpy()), abs=1e-12)
    # one class only: the AUC is undefined
    assert G.roc_auc(torch.ones(5, dtype=torch.bool), torch.arange(5.0)) is None
    assert G.roc_auc(torch.zeros(5, dtype=torch.bool), torch.arange(5.0)) is None


def test_identical_checkpoints_give_zero_movement():
    img, txt = paired(200, 16, 16)
    sd = G.spatial_disorder((img, txt), (img, txt))
    for m in ("image", "text"):
        assert sd["rotation"][m]["max"] == 0.0
        assert sd["topology_drift"][m]["max"] == 0.0
        assert sd["procrustes"][m]["spectrum"]["max"] < 1e-4
        assert sd["cka"][m] == pytest.approx(1.0) and sd["mutual_knn"][m] == 1.0
    dev = sd["deviation"]
    assert dev["mismatch"]["max"] == 0.0 and dev["alignment_drift"]["max"] == 0.0
    assert dev["desync"]["max"] < 1e-4
    assert sd["flips"]["image_to_text"]["n_forgotten"] == 0 and sd["flips"]["text_to_image"]["n_learned"] == 0


def test_identical_checkpoints_rank_deficient_give_identity_rotation():
    a = unit(10, 32, 17)  # N < d: Procrustes is not unique; geomlab picks the one nearest the identity
    res = G.procrustes(a, a)
    assert res.spectrum.max() < 1e-4 and torch.allclose(res.rotation, torch.eye(32, dtype=torch.float64), atol=1e-12)
    assert math.isnan(res.rigid_share)  # nothing moved: no displacement to share out


def test_rotating_both_modalities_is_rigid():
    img, txt = paired(300, 16, 18)
    q = random_orthogonal(16, 19)
    sd = G.spatial_disorder((img, txt), (img @ q, txt @ q))
    for m in ("image", "text"):
        assert sd["procrustes"][m]["rigid_share"] == pytest.approx(1.0, abs=1e-9)
        assert sd["topology_drift"][m]["max"] < 0.02  # float32 arccos
        assert sd["rotation"][m]["mean"] > 10
        assert np.allclose(sorted(G.procrustes(img, img @ q).spectrum.numpy()), sorted(numpy_eigen_angles(q)), atol=1e-5)
    dev = sd["deviation"]
    assert dev["alignment_drift"]["max"] < 1e-8 and abs(dev["alignment_drift"]["min"]) < 1e-8
    assert dev["desync"]["max"] < 1e-4
    assert abs(dev["modality_gap"]["a"] - dev["modality_gap"]["b"]) < 1e-12
    assert G.retrieval_metrics(img.float(), txt.float()) == G.retrieval_metrics((img @ q).float(), (txt @ q).float())
    assert sd["flips"]["image_to_text"]["n_forgotten"] == 0


def test_rotating_only_images_desynchronises_by_that_rotation():
    img, txt = paired(300, 16, 20)
    q = random_orthogonal(16, 21)
    dev = G.inter_modal_deviation(img, txt, img @ q, txt)
    assert np.allclose(dev["desync_spectrum"].numpy(), numpy_eigen_angles(q), atol=1e-5)
    assert torch.allclose(dev["mismatch"], degrees_between(img, img @ q), atol=1e-6)
    assert dev["desync_mean"] == pytest.approx(float(numpy_eigen_angles(q).mean()), abs=1e-5)


def test_several_captions_per_image_match_brute_force():
    img_a = unit(40, 8, 22)
    caption_image = torch.arange(40).repeat_interleave(2)
    txt_a = perturb(img_a[caption_image], 0.6, 23)
    img_b, txt_b = perturb(img_a, 0.3, 24), perturb(txt_a, 0.3, 25)

    dev = G.inter_modal_deviation(img_a, txt_a, img_b, txt_b, caption_image)
    theta_i, theta_t = degrees_between(img_a, img_b), degrees_between(txt_a, txt_b)
    assert torch.allclose(dev["mismatch"], (theta_i[caption_image] - theta_t).abs(), atol=1e-6)
    drift = degrees_between(img_b[caption_image], txt_b) - degrees_between(img_a[caption_image], txt_a)
    assert torch.allclose(dev["alignment_drift"], drift, atol=1e-6)
    gap = (img_a.mean(0) - txt_a.mean(0)).norm()  # every caption counts in the text mean
    assert dev["modality_gap_a"] == pytest.approx(float(gap), abs=1e-12)

    fl = G.flips(img_a, txt_a, img_b, txt_b, caption_image)
    ranks_a, ranks_b = brute_ranks(img_a, txt_a, caption_image), brute_ranks(img_b, txt_b, caption_image)
    # an image query scores the mean of its captions' values
    image_drift = torch.stack([drift[caption_image == i].mean() for i in range(40)])
    for k, (direction, score) in enumerate((("image_to_text", image_drift), ("text_to_image", drift))):
        ca, cb = ranks_a[k] == 0, ranks_b[k] == 0
        forgotten = (ca & ~cb)[ca].numpy()
        f = fl[direction]
        assert f["queries"] == ca.numel() and f["correct_a"] == int(ca.sum()) and f["correct_b"] == int(cb.sum())
        assert f["forgotten"] == pytest.approx(float(forgotten.mean()))
        assert 0 < forgotten.sum() < len(forgotten), direction
        assert f["auc_alignment_drift"] == pytest.approx(pairwise_auc(forgotten, score[ca].numpy()), abs=1e-12)


def test_summarize_matches_numpy():
    x = np.random.default_rng(28).normal(90, 40, 500)
    out = summarize(torch.from_numpy(x), hist=True, bins=18)
    assert out["n"] == 500 and out["mean"] == pytest.approx(x.mean()) and out["std"] == pytest.approx(x.std())
    for key, q in (("p10", 0.1), ("p25", 0.25), ("median", 0.5), ("p75", 0.75), ("p90", 0.9)):
        assert out[key] == pytest.approx(np.quantile(x, q))
    assert (out["min"], out["max"]) == (x.min(), x.max())
    # values outside [0, 180] land in the first / last bin
    assert out["hist"]["counts"] == np.histogram(np.clip(x, 0, 180), bins=18, range=(0, 180))[0].tolist()


def test_accuracy_matrix_forgetting_bwt():
    A = torch.tensor([[0.9, 0.1, 0.0], [0.6, 0.8, 0.1], [0.5, 0.7, 0.9]], dtype=torch.float64)
    # probe set d learned at phase d (the full metrics: tests/test_forgetting.py)
    assert G.forgetting(A, [0, 1, 2])[:2].tolist() == pytest.approx([0.4, 0.1])
    assert G.bwt(A, [0, 1, 2]) == pytest.approx(((0.5 - 0.9) + (0.7 - 0.8)) / 2)
    assert G.last_accuracy(A) == pytest.approx(0.7)
    # from embeddings: ½ (image→text R@1 + text→image R@1) of brute-force ranks, row by row
    img, txt = paired(50, 8, 26)
    img_b = perturb(img, 0.5, 27)
    rows = [{"d0": DomainEmbeddings(x.float(), txt.float(), torch.arange(50))} for x in (img, img_b)]

    def r1(x):
        i2t, t2i = brute_ranks(x.float(), txt.float(), torch.arange(50))
        return 0.5 * (float((i2t == 0).double().mean()) + float((t2i == 0).double().mean()))

    expected = torch.tensor([[r1(img)], [r1(img_b)]], dtype=torch.float64)
    assert expected[0, 0] != expected[1, 0]
    assert torch.allclose(G.accuracy_matrix(rows), expected, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# degenerate input: each case against its definition (docs/definitions.md, "Non-finite and
# degenerate input" and each measure's edge cases)


def collapsed(n, d, seed=0):
    """A space collapsed to one point: the same unit row n times."""
    return unit(1, d, seed).repeat(n, 1)


def dense_cka(x, y):
    """HSIC(K, L) / √(HSIC(K, K) HSIC(L, L)) with N×N kernels and the centring matrix."""
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    k, l_ = x @ x.T, y @ y.T

    def hsic(p, q):
        return torch.trace(p @ h @ q @ h)

    return float(hsic(k, l_) / torch.sqrt(hsic(k, k) * hsic(l_, l_)))


def test_linear_cka_of_a_collapsed_side_is_nan():
    y = unit(200, 16, 30)
    x = collapsed(200, 16, 31)
    assert math.isnan(dense_cka(x, y))  # the kernel form is 0/0 as well
    assert math.isnan(G.linear_cka(x, y)) and math.isnan(G.linear_cka(y, x))
    assert math.isnan(G.linear_cka(x, x))
    one_hot = torch.zeros(200, 16, dtype=torch.float64)
    one_hot[:, 0] = 1  # its column mean is exact: the centred side is exactly zero
    assert math.isnan(G.linear_cka(one_hot, y))
    # float16 traces of identical rows, as the analyser passes them (unit rows)
    x16, y16 = G.measures._unit(x.half()), G.measures._unit(y.half())
    assert math.isnan(G.linear_cka(x16, y16))
    assert math.isnan(G.linear_cka(y[:1], x[:1]))  # one row: no variance
    # variance at float16 resolution is real variance: CKA is defined and matches the kernel form
    near = (x + 1e-3 * unit(200, 16, 32)).half().double()
    # (the kernel form of the rows as given loses 8 digits to the common offset; HSIC does not
    # change when the rows are centred first, which the reference does to keep them)
    assert G.linear_cka(near, y) == pytest.approx(dense_cka(near - near.mean(0), y), rel=1e-9)
    assert G.linear_cka(near, y) == pytest.approx(dense_cka(near, y), rel=1e-6)


def test_spatial_disorder_of_a_collapsed_side():
    img, txt = paired(120, 16, 33)
    img_b = collapsed(120, 16, 34)
    sd = G.spatial_disorder((img, txt), (img_b, txt))
    assert math.isnan(sd["cka"]["image"]) and math.isnan(sd["mutual_knn"]["image"])
    assert sd["cka"]["text"] == pytest.approx(1.0) and sd["mutual_knn"]["text"] == 1.0
    # Procrustes is still defined (rank-deficient: see test_procrustes_of_a_collapsed_side)
    ref, _ = scipy.linalg.orthogonal_procrustes(img.numpy(), img_b.numpy())
    num = np.linalg.norm(img.numpy() @ ref - img_b.numpy()) ** 2
    den = np.linalg.norm(img.numpy() - img_b.numpy()) ** 2
    assert sd["procrustes"]["image"]["rigid_share"] == pytest.approx(1 - num / den, abs=1e-9)


def test_procrustes_of_a_collapsed_side():
    """AᵀB of rank 1: R attains the minimum (scipy's value), maps the one direction of A to the mean
    direction of B, and is the identity on what the data leave free."""
    a, b = collapsed(50, 8, 35), unit(50, 8, 36)
    p = G.procrustes(a, b)
    r = p.rotation
    assert torch.allclose(r.T @ r, torch.eye(8, dtype=torch.float64), atol=1e-12)
    ref, _ = scipy.linalg.orthogonal_procrustes(a.numpy(), b.numpy())
    assert float((a @ r - b).norm()) == pytest.approx(float(np.linalg.norm(a.numpy() @ ref - b.numpy())), rel=1e-12)
    w = F.normalize(b.sum(0, keepdim=True), dim=1)
    assert torch.allclose(a[:1] @ r, w, atol=1e-12)
    q, _ = torch.linalg.qr(torch.cat([a[:1], w, unit(6, 8, 37)]).T)
    free = q[:, 2:].T  # orthogonal to both a's direction and b's mean
    assert torch.allclose(free @ r, free, atol=1e-12)
    den = float(((a - b) ** 2).sum())
    assert p.rigid_share == pytest.approx(1 - float(((a @ r - b) ** 2).sum()) / den, abs=1e-12)


def test_nothing_moved():
    """a = b: the rigid share is 0/0 (NaN); R = I, so the spectrum and the desync are rounding."""
    img, txt = paired(100, 8, 38)
    p = G.procrustes(img, img)
    assert math.isnan(p.rigid_share) and p.spectrum.max() < 1e-4
    dev = G.inter_modal_deviation(img, txt, img, txt)
    assert dev["desync_max"] < 1e-4 and float(dev["mismatch"].abs().max()) == 0.0
    assert float(dev["alignment_drift"].abs().max()) == 0.0


@pytest.mark.parametrize("n", [0, 1])
def test_topology_drift_without_pairs_is_nan(n):
    out = G.topology_drift(unit(n, 4, 39), unit(n, 4, 40))
    assert out["pairs"] == 0 and out["exact"]
    assert all(math.isnan(out[k]) for k in ("mean", "median", "p90", "max"))


def test_mutual_knn_undefined_cases():
    k = 10
    # k ≥ N − 1: every other sample is a neighbour, whatever the embeddings
    for n in (1, 5, k, k + 1):
        assert math.isnan(G.mutual_knn(unit(n, 6, 41), unit(n, 6, 42), k)), n
    # N = k + 2 is the first that depends on the data: brute force
    x, y = unit(k + 2, 6, 43), unit(k + 2, 6, 44)

    def nn(z):
        s = z @ z.T
        s.fill_diagonal_(-math.inf)
        return [set(r.tolist()) for r in torch.topk(s, k, dim=1).indices]

    assert G.mutual_knn(x, y, k) == pytest.approx(np.mean([len(p & q) / k for p, q in zip(nn(x), nn(y))]))
    assert math.isnan(G.mutual_knn(collapsed(50, 6, 45), unit(50, 6, 46), k))  # every neighbour a tie
    with pytest.raises(ValueError, match="mutual_knn: k must be at least 1"):
        G.mutual_knn(x, y, 0)


def test_zero_rows_have_no_direction():
    a, b = unit(30, 6, 47), unit(30, 6, 48)
    b[[3, 7]] = 0
    for name, call in (("rotation_angles", lambda: G.rotation_angles(a, b)),
                       ("topology_drift", lambda: G.topology_drift(a, b)),
                       ("procrustes", lambda: G.procrustes(a, b)),
                       ("mutual_knn", lambda: G.mutual_knn(a, b, 5)),
                       ("modality_gap", lambda: G.modality_gap(a, b)),
                       ("inter_modal_deviation", lambda: G.inter_modal_deviation(a, a, b, a)),
                       ("flips", lambda: G.flips(a, a, b, a)),
                       ("spatial_disorder", lambda: G.spatial_disorder((a, a), (b, a)))):
        with pytest.raises(ValueError, match=rf"^{name}: 2 of 30 rows of \w+ are zero"):
            call()
    # CKA takes rows as given: a zero row is a point like any other
    assert G.linear_cka(a, b) == pytest.approx(dense_cka(a, b), rel=1e-9)


def test_modality_gap_of_an_empty_side_is_nan():
    assert math.isnan(G.modality_gap(unit(0, 4, 49), unit(5, 4, 50)))


def test_roc_auc_without_two_classes_is_none():
    assert G.roc_auc(torch.zeros(0, dtype=torch.bool), torch.zeros(0)) is None
    assert G.roc_auc(torch.ones(3, dtype=torch.bool), torch.tensor([0.1, 0.1, 0.1])) is None
    # all scores tied: defined, no predictive power
    assert G.roc_auc(torch.tensor([True, False, True]), torch.ones(3)) == 0.5


def test_flip_shares_of_nothing_are_nan():
    img, txt = paired(40, 8, 51)
    wrong = G.flips(img, -txt, img, txt)["image_to_text"]  # nothing is right at a
    assert wrong["correct_a"] == 0 and math.isnan(wrong["forgotten"]) and wrong["auc_mismatch"] is None
    assert wrong["learned"] == pytest.approx(wrong["correct_b"] / 40)
    right = G.flips(img, img, img, img)["text_to_image"]  # everything is right at a
    assert right["correct_a"] == 40 and math.isnan(right["learned"]) and right["forgotten"] == 0.0


def test_summarize_of_an_empty_set():
    out = summarize(torch.zeros(0), hist=True, bins=4)
    assert out == {"n": 0, "mean": None, "std": None, "min": None, "p10": None, "p25": None, "median": None,
                   "p75": None, "p90": None, "max": None, "hist": {"lo": 0.0, "hi": 180.0, "counts": [0, 0, 0, 0]}}


def test_metrics_from_ranks_without_queries_are_nan():
    m = G.metrics_from_ranks(torch.zeros(0, dtype=torch.long), torch.tensor([0, 2]))
    assert all(math.isnan(v) for k, v in m.items() if k.startswith("image_to_text"))
    assert m["text_to_image_R@1"] == 0.5 and m["text_to_image_mean_rank"] == 2.0


# ---------------------------------------------------------------------------------------------
# non-finite input: never a number


def poisoned(x, rows, value):
    x = x.clone()
    x[rows] = value
    return x


def nonfinite_calls(bad, good):
    """(measure, call) for every public function, `bad` in one of its embedding arguments."""
    ids = torch.arange(good.shape[0])
    return [
        ("rotation_angles", lambda: G.rotation_angles(good, bad)),
        ("topology_drift", lambda: G.topology_drift(bad, good)),
        ("procrustes", lambda: G.procrustes(good, bad)),
        ("linear_cka", lambda: G.linear_cka(good, bad)),
        ("mutual_knn", lambda: G.mutual_knn(bad, good, 5)),
        ("modality_gap", lambda: G.modality_gap(good, bad)),
        ("inter_modal_deviation", lambda: G.inter_modal_deviation(good, good, good, bad)),
        ("flips", lambda: G.flips(good, bad, good, good)),
        ("spatial_disorder", lambda: G.spatial_disorder((good, good), (bad, good))),
        ("retrieval_metrics", lambda: G.retrieval_metrics(good.float(), bad.float())),
        ("retrieval_metrics", lambda: G.accuracy_matrix([{"d": DomainEmbeddings(bad.float(), good.float(), ids)}])),
    ]


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_rows_raise_naming_the_measure(value):
    good = unit(40, 6, 52)
    bad = poisoned(good, [0, 5, 9], value)
    for name, call in nonfinite_calls(bad, good):
        with pytest.raises(ValueError, match=rf"^{name}: 3 of 40 rows of \w+ are not finite \(NaN or inf\)"):
            call()
    with pytest.raises(ValueError, match=r"^eigen_angles: 1 of 4 rows of rotation are not finite"):
        G.eigen_angles(poisoned(torch.eye(4, dtype=torch.float64), [2], value))
    with pytest.raises(ValueError, match=r"^roc_auc: 1 of 3 entries of scores are not finite"):
        G.roc_auc(torch.tensor([True, False, True]), torch.tensor([0.2, value, 0.1]))
    with pytest.raises(ValueError, match=r"^summarize: 2 of 4 entries of values are not finite"):
        summarize(torch.tensor([1.0, value, 3.0, value]))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_kernels_refuse_non_finite_features(backend, value):
    """With NaN every "score > positive" comparison is false: every positive would rank first."""
    good = unit(30, 8, 53).float()
    bad = poisoned(good, [1, 2], value)
    for call in (lambda: kernels.retrieval_ranks(bad, good, backend=backend),
                 lambda: kernels.topk(bad, good, 3, backend=backend),
                 lambda: kernels.similarity(bad, good, backend=backend)):
        with pytest.raises(ValueError, match=r"2 of 30 rows of the first \(queries, image\) input are not finite"):
            call()
    with pytest.raises(ValueError, match=r"2 of 30 rows of the second \(gallery, text\) input are not finite"):
        kernels.retrieval_ranks(good, bad, backend=backend)


def test_kernels_accept_finite_features_whose_sum_overflows():
    """The finiteness check sums first: an overflowing fp16 sum of finite features is not an error."""
    big = torch.full((64, 4), 60000.0, dtype=torch.float16)
    big[::2] *= -0.5
    assert not torch.isfinite(big.sum())
    i2t, t2i = kernels.retrieval_ranks(big, big, backend="torch")
    assert i2t.shape == (64,) and t2i.shape == (64,)
