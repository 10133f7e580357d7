"""geomlab.geometry against independent computations and cases with known answers (SPEC §5.2, §5.3)."""
import math

import numpy as np
import pytest
import scipy.linalg
import scipy.stats
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from geomlab import geometry as G
from geomlab.geometry.measures import numpy_eigen_angles


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


@pytest.mark.parametrize("tile", [7, 64])
def test_topology_drift_matches_dense(tile):
    a = unit(90, 5, 10)
    b = perturb(a, 0.2, 11)

    def sam(z):
        return torch.rad2deg(torch.arccos((z @ z.T).clamp(-1, 1)))

    d = (sam(b) - sam(a)).abs()
    iu = torch.triu_indices(90, 90, 1)
    vals = d[iu[0], iu[1]]
    out = G.topology_drift(a, b, tile=tile)
    assert out["exact"] and out["pairs"] == 90 * 89 // 2
    assert out["mean"] == pytest.approx(float(vals.mean()), rel=1e-4)
    assert out["max"] == pytest.approx(float(vals.max()), rel=1e-4)
    assert abs(out["median"] - float(vals.median())) <= 0.011


def test_topology_drift_sampled_above_exact_limit():
    a = unit(90, 5, 10)
    b = perturb(a, 0.2, 11)
    vals = G.topology_drift(a, b)
    sampled = G.topology_drift(a, b, exact_limit=10, sample_pairs=1)
    assert not sampled["exact"] and sampled["pairs"] >= 10**7
    assert sampled["mean"] == pytest.approx(vals["mean"], rel=0.01)


def test_retrieval_ranks_match_dense_argsort():
    img, txt = paired(80, 8, 12)
    s = img @ txt.T
    ref_i2t = (s > s.diag().unsqueeze(1)).sum(1)  # no ties with random floats
    ref_t2i = (s.T > s.diag().unsqueeze(1)).sum(1)
    m = G.retrieval_metrics(img.float(), txt.float())
    assert m["image_to_text_R@1"] == pytest.approx(float((ref_i2t == 0).double().mean()))
    assert m["text_to_image_R@5"] == pytest.approx(float((ref_t2i < 5).double().mean()))
    assert m["image_to_text_mean_rank"] == pytest.approx(float(ref_i2t.double().mean()) + 1)


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
    assert f["correct_a"] == int(ca.sum())
    assert f["forgotten"] == pytest.approx(forgotten.mean())
    assert f["auc_alignment_drift"] == pytest.approx(roc_auc_score(forgotten, dev["alignment_drift"][ca].numpy()))
    assert f["auc_mismatch"] == pytest.approx(roc_auc_score(forgotten, dev["mismatch"][ca].numpy()))


def test_roc_auc_matches_sklearn_with_ties():
    g = torch.Generator().manual_seed(27)
    labels = torch.rand(400, generator=g) < 0.3
    scores = torch.randint(0, 20, (400,), generator=g).double() + labels.double() * 3  # many ties
    assert G.roc_auc(labels, scores) == pytest.approx(roc_auc_score(labels.numpy(), scores.numpy()), abs=1e-12)
    assert G.roc_auc(torch.ones(5, dtype=torch.bool), torch.arange(5.0)) is None


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
    assert res.spectrum.max() < 1e-4 and res.rigid_share == 1.0


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
    assert torch.allclose(dev["mismatch"], G.rotation_angles(img, img @ q))


def test_several_captions_per_image():
    img = unit(40, 8, 22)
    caption_image = torch.arange(40).repeat_interleave(2)
    txt = perturb(img[caption_image], 0.3, 23)
    sd = G.spatial_disorder((img, txt, caption_image), (perturb(img, 0.1, 24), perturb(txt, 0.1, 25), caption_image))
    assert sd["n_texts"] == 80 and sd["flips"]["image_to_text"]["queries"] == 40
    assert sd["flips"]["text_to_image"]["queries"] == 80


def test_accuracy_matrix_forgetting_bwt():
    A = torch.tensor([[0.9, 0.1, 0.0], [0.6, 0.8, 0.1], [0.5, 0.7, 0.9]], dtype=torch.float64)
    assert torch.allclose(G.forgetting(A), torch.tensor([0.4, 0.1, 0.1 - 0.9], dtype=torch.float64))
    assert G.bwt(A) == pytest.approx(((0.5 - 0.9) + (0.7 - 0.8)) / 2)
    assert G.average_accuracy(A) == pytest.approx(0.7)
    img, txt = paired(50, 8, 26)
    from geomlab.traces import DomainEmbeddings
    row = {"d0": DomainEmbeddings(img.float(), txt.float(), torch.arange(50))}
    acc = G.accuracy_matrix([row, row])
    m = G.retrieval_metrics(img.float(), txt.float())
    assert acc.shape == (2, 1)
    assert acc[1, 0] == pytest.approx(0.5 * (m["image_to_text_R@1"] + m["text_to_image_R@1"]))
