"""Spatial Disorder: how the image and text spaces move from checkpoint a to checkpoint b.

Every function takes plain tensors (rows = samples; row i of `a` and `b` is the same probe sample)
and normalises its inputs to unit length first, so float16 traces can be passed as they are.
Angles are in degrees. Nothing N×N is held in memory: topology drift and k-NN work tile by tile.
Each measure refuses rows holding NaN or inf, and those that normalise their rows refuse zero rows
(no direction), with a ValueError naming the measure and how many rows are at fault (`check_rows`);
a value a degenerate input leaves undefined is NaN (None for the AUC), never a stand-in number.
The definitions, with their conventions and degenerate cases, are in docs/definitions.md.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from geomlab import kernels
from geomlab.runtime import cpu_workers, map_threads

from .checks import check_rows
from .stats import quantile_from_hist, summarize

DEG = 180.0 / math.pi


def _unit(x, dtype=torch.float64) -> torch.Tensor:
    x = torch.as_tensor(x)
    return F.normalize(x.detach().to("cpu", dtype), dim=-1)


def _centred(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(x − its column mean in float64, whether x is constant: all rows equal up to the rounding of
    the mean, ‖x − x̄‖_F ≤ 10⁻¹⁰ ‖x‖_F; fewer than two rows count as constant)."""
    x = torch.as_tensor(x).detach().to("cpu", torch.float64)
    xc = x - x.mean(0, keepdim=True) if x.shape[0] else x
    return xc, bool(torch.linalg.vector_norm(xc) <= 1e-10 * torch.linalg.vector_norm(x))


def _pair_index(caption_image, n_images: int, n_texts: int) -> torch.Tensor:
    if caption_image is None:
        if n_images != n_texts:
            raise ValueError(f"{n_images} images but {n_texts} texts: pass caption_image")
        return torch.arange(n_images)
    return torch.as_tensor(caption_image).to("cpu", torch.long)


# ---------------------------------------------------------------------------------------------
# rotation angles


def rotation_angles(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample rotation angle θ_i = arccos⟨a_i, b_i⟩ in degrees (a_i, b_i unit vectors).

    Computed as θ_i = 2·atan2(‖a_i − b_i‖, ‖a_i + b_i‖), which equals arccos⟨a_i, b_i⟩ but stays
    accurate for tiny angles (identical rows give exactly 0). Returns a float64 tensor [N].
    A zero row has no direction, so no angle: ValueError (as for NaN or inf).
    """
    check_rows("rotation_angles", nonzero=True, a=a, b=b)
    u, v = _unit(a), _unit(b)
    if u.shape != v.shape:
        raise ValueError(f"rotation_angles: shapes differ {tuple(u.shape)} vs {tuple(v.shape)}")
    return _angles(u, v)


# Each measure below checks its input and normalises it, then calls its core on the unit rows
# (`_angles`, `_procrustes`, ...). `spatial_disorder` checks and normalises a pair once and calls the
# cores: on a study's probe sets the repeated checks were about a third of its time.


def _angles(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """rotation_angles of unit float64 rows."""
    return 2.0 * torch.atan2((u - v).norm(dim=-1), (u + v).norm(dim=-1)) * DEG


# ---------------------------------------------------------------------------------------------
# topology drift


class _DriftAcc:
    def __init__(self, nbins: int, bin_width: float):
        self.hist = torch.zeros(nbins, dtype=torch.long)
        self.total, self.count, self.peak, self.nbins, self.bin_width = 0.0, 0, 0.0, nbins, bin_width

    def add(self, d: torch.Tensor) -> None:
        if d.numel() == 0:
            return
        self.total += float(d.sum())
        self.count += d.numel()
        self.peak = max(self.peak, float(d.max()))
        idx = d.mul(1.0 / self.bin_width).to(torch.int64).clamp_(0, self.nbins - 1).ravel()
        self.hist.add_(torch.bincount(idx, minlength=self.nbins))

    def merge(self, other: "_DriftAcc") -> None:
        self.total += other.total
        self.count += other.count
        self.peak = max(self.peak, other.peak)
        self.hist.add_(other.hist)


def _drift(s_old: torch.Tensor, s_new: torch.Tensor) -> torch.Tensor:
    d = torch.acos(s_new.clamp_(-1.0, 1.0)).sub_(torch.acos(s_old.clamp_(-1.0, 1.0)))
    return d.abs_().mul_(DEG)


def _drift_rows(x, y, i0, i1, tile, nbins: int, bin_width: float) -> _DriftAcc:
    """The drift of pairs (i, j) with i in [i0, i1) and j > i."""
    acc = _DriftAcc(nbins, bin_width)
    n = x.shape[0]
    diag = _drift(x[i0:i1] @ x[i0:i1].T, y[i0:i1] @ y[i0:i1].T)
    acc.add(diag[torch.triu(torch.ones_like(diag, dtype=torch.bool), diagonal=1)])
    for j0 in range(i1, n, 4 * tile):
        j1 = min(j0 + 4 * tile, n)
        acc.add(_drift(x[i0:i1] @ x[j0:j1].T, y[i0:i1] @ y[j0:j1].T))
    return acc


def topology_drift(a_old: torch.Tensor, a_new: torch.Tensor, *, exact_limit: int = 20_000,
                   sample_pairs: int = 10_000_000, seed: int = 0, tile: int = 512,
                   bin_width: float = 0.01, workers: int | None = None) -> dict:
    """Drift of the self-angle matrix: |SAM^new_ij − SAM^old_ij| over pairs i ≠ j, in degrees,
    with SAM_ij = arccos⟨a_i, a_j⟩.

    For N ≤ `exact_limit` every pair i < j is visited, `tile` rows at a time (memory O(tile·N)),
    row tiles shared among `workers` threads (default: the usable cores, ≤ 4); above it a seeded
    uniform sample of max(sample_pairs, 10⁷) ordered pairs i ≠ j is used.
    Returns {"mean", "median", "p90", "max", "pairs", "exact", "bin_width"}: mean and max are exact
    over the visited pairs; median and p90 come from a histogram of `bin_width`° bins (bin centres).
    Computed in float32. N < 2 has no pair: pairs = 0 and mean, median, p90, max are NaN.
    Zero rows (no direction) raise ValueError, as NaN or inf do.
    """
    check_rows("topology_drift", nonzero=True, a_old=a_old, a_new=a_new)
    x, y = _unit(a_old, torch.float32), _unit(a_new, torch.float32)
    if x.shape != y.shape:
        raise ValueError(f"topology_drift: shapes differ {tuple(x.shape)} vs {tuple(y.shape)}")
    return _topology_drift(x, y, exact_limit=exact_limit, sample_pairs=sample_pairs, seed=seed, tile=tile,
                           bin_width=bin_width, workers=workers)


def _topology_drift(x: torch.Tensor, y: torch.Tensor, *, exact_limit: int, sample_pairs: int, seed: int,
                    tile: int = 512, bin_width: float = 0.01, workers: int | None = None) -> dict:
    """topology_drift of unit float32 rows."""
    n = x.shape[0]
    nbins = int(math.ceil(180.0 / bin_width)) + 1
    acc = _DriftAcc(nbins, bin_width)
    exact = n <= exact_limit
    workers = cpu_workers() if workers is None else max(1, int(workers))
    with torch.no_grad():
        if exact:
            def row_tile(i0):
                return _drift_rows(x, y, i0, min(i0 + tile, n), tile, nbins, bin_width)

            for part in map_threads(row_tile, range(0, n, tile), workers):  # merged in row order
                acc.merge(part)
        else:
            gen = torch.Generator().manual_seed(seed)
            remaining = max(int(sample_pairs), 10_000_000)
            chunk = max(1 << 12, min(1 << 20, (1 << 24) // max(x.shape[1], 1)))  # ≤ 256 MB of gathers
            while remaining > 0:
                m = min(chunk, remaining)
                i = torch.randint(0, n, (m,), generator=gen)
                j = torch.randint(0, n - 1, (m,), generator=gen)
                j = j + (j >= i).long()  # uniform over j ≠ i
                acc.add(_drift((x[i] * x[j]).sum(1), (y[i] * y[j]).sum(1)))
                remaining -= m
    if acc.count == 0:  # no pair: nothing to average
        nan = float("nan")
        return {"mean": nan, "median": nan, "p90": nan, "max": nan, "pairs": 0, "exact": exact,
                "bin_width": bin_width}
    return {"mean": acc.total / acc.count, "median": quantile_from_hist(acc.hist, bin_width, 0.5),
            "p90": quantile_from_hist(acc.hist, bin_width, 0.9), "max": acc.peak, "pairs": int(acc.count),
            "exact": exact, "bin_width": bin_width}


# ---------------------------------------------------------------------------------------------
# orthogonal Procrustes


class ProcrustesResult(NamedTuple):
    rotation: torch.Tensor         # [d, d] orthogonal R (float64)
    spectrum: torch.Tensor         # [d] eigen-angles of R in degrees, descending
    rigid_share: float             # 1 − ‖a R − b‖² / ‖a − b‖² (NaN when a = b)
    residual_angles: torch.Tensor  # [N] angle between a_i R and b_i, degrees


def eigen_angles(rotation: torch.Tensor) -> torch.Tensor:
    """Eigen-angles of an orthogonal matrix Q in degrees, descending: |arg λ_k| over its d eigenvalues.

    Q is normal, so its symmetric part (Q + Qᵀ)/2 has eigenvalues cos θ_k; θ_k = arccos of those
    (a conjugate pair e^{±iθ} gives θ twice; a reflection gives 180°). NaN or inf entries raise
    ValueError.
    """
    check_rows("eigen_angles", rotation=rotation)
    return _eigen_angles(torch.as_tensor(rotation).to("cpu", torch.float64))


def _eigen_angles(q: torch.Tensor) -> torch.Tensor:
    """eigen_angles of a finite float64 matrix."""
    cos = torch.linalg.eigvalsh(0.5 * (q + q.T)).clamp(-1.0, 1.0)
    return torch.sort(torch.acos(cos) * DEG, descending=True).values


def _procrustes_rotation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """R = argmin_{R ∈ O(d)} ‖a R − b‖_F = U Vᵀ with aᵀb = U Σ Vᵀ. Where aᵀb is rank deficient
    (N < d, or directions no sample uses), R is chosen closest to the identity on the unused subspace."""
    return _procrustes_rotations(a, b.unsqueeze(0))[0]


def _procrustes_rotations(a: torch.Tensor, bs: torch.Tensor) -> torch.Tensor:
    """_procrustes_rotation(a, bs[t]) for every t of a stack bs [T, N, d], as a [T, d, d] stack: one
    batched SVD (a series of traces against one reference costs one call, not T)."""
    m = a.T @ bs
    u, s, vh = torch.linalg.svd(m)
    d = m.shape[-1]
    tol = s[:, :1] * max(a.shape[0], d) * 1e-12
    ranks = (s > tol).sum(-1)
    out = torch.empty_like(m)
    for r in ranks.unique().tolist():
        at = torch.nonzero(ranks == r).flatten()
        ut, vt = u[at], vh[at].mT
        if r >= d:
            out[at] = ut @ vt.mT
            continue
        u_perp, v_perp = ut[..., r:], vt[..., r:]
        # maximise tr(R) over the free block: Q = polar factor of (V⊥ᵀ U⊥)ᵀ
        p, _, wh = torch.linalg.svd(v_perp.mT @ u_perp)
        q = wh.mT @ p.mT
        out[at] = ut[..., :r] @ vt[..., :r].mT + u_perp @ q @ v_perp.mT
    return out


def procrustes(a_old: torch.Tensor, a_new: torch.Tensor) -> ProcrustesResult:
    """Orthogonal Procrustes from a_old to a_new: R = argmin_{R ∈ O(d)} ‖A R − B‖_F = U Vᵀ where
    AᵀB = U Σ Vᵀ (A, B row-normalised, float64).

    rigid_share = 1 − ‖A R − B‖²_F / ‖A − B‖²_F, clipped to [0, 1]; NaN when nothing moved
    (‖A − B‖²_F ≤ 10⁻²⁴: there is no displacement to share out). spectrum = the eigen-angles of R
    (`eigen_angles`), residual_angles = rotation_angles(A R, B).
    Rank-deficient AᵀB (N < d, a collapsed side, unused directions): R is fixed by the data on the
    span of the nonzero singular vectors and is the orthogonal map closest to the identity on the
    rest, so A = B gives R = I (spectrum 0 up to rounding, about 10⁻⁶°). Zero rows (no direction)
    raise ValueError, as NaN or inf do.
    """
    check_rows("procrustes", nonzero=True, a_old=a_old, a_new=a_new)
    a, b = _unit(a_old), _unit(a_new)
    if a.shape != b.shape:
        raise ValueError(f"procrustes: shapes differ {tuple(a.shape)} vs {tuple(b.shape)}")
    return _procrustes(a, b)


def _procrustes(a: torch.Tensor, b: torch.Tensor) -> ProcrustesResult:
    """procrustes of unit float64 rows."""
    rot = _procrustes_rotation(a, b)
    aligned = a @ rot
    den = float(((a - b) ** 2).sum())
    num = float(((aligned - b) ** 2).sum())
    share = float("nan") if den <= 1e-24 else min(1.0, max(0.0, 1.0 - num / den))
    return ProcrustesResult(rot, _eigen_angles(rot), share, _angles(_unit(aligned), b))


# ---------------------------------------------------------------------------------------------
# representation similarity


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA in its d×d feature form: with column-centred X, Y,
    CKA = ‖YᵀX‖²_F / (‖XᵀX‖_F · ‖YᵀY‖_F). Inputs are not re-normalised (rows as given), float64.
    Equals HSIC(K, L)/√(HSIC(K, K)·HSIC(L, L)) with K = XXᵀ, L = YYᵀ, without any N×N matrix.

    NaN when either side is constant (all its rows equal up to rounding, ‖X − X̄‖_F ≤ 10⁻¹⁰ ‖X‖_F;
    fewer than two rows included): its centred kernel is zero and the ratio 0/0 is undefined.
    NaN or inf rows raise ValueError.
    """
    check_rows("linear_cka", x=x, y=y)
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka: {x.shape[0]} rows vs {y.shape[0]}: rows must be the same samples")
    return _linear_cka(x, y)


def _linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """linear_cka of finite rows."""
    (xc, x_constant), (yc, y_constant) = _centred(x), _centred(y)
    if x_constant or y_constant:
        return float("nan")
    num = float(torch.linalg.matrix_norm(yc.T @ xc) ** 2)
    den = float(torch.linalg.matrix_norm(xc.T @ xc) * torch.linalg.matrix_norm(yc.T @ yc))
    return num / den


def _knn(x: torch.Tensor, rows: slice, k: int) -> torch.Tensor:
    s = x[rows] @ x.T
    idx = torch.arange(rows.start, rows.stop)
    s[torch.arange(len(idx)), idx] = -float("inf")
    return torch.topk(s, k, dim=1).indices


def mutual_knn(x: torch.Tensor, y: torch.Tensor, k: int = 10, *, tile: int = 1024) -> float:
    """Mutual k-NN overlap: mean over i of |N^x_k(i) ∩ N^y_k(i)| / k, where N_k(i) are the k nearest
    neighbours of sample i by cosine similarity, i itself excluded (ties broken by `torch.topk`, in
    no defined order). Streamed `tile` rows at a time (memory O(tile·N)).

    NaN when it says nothing about the data: k ≥ N − 1 (every other sample is then a neighbour and
    the overlap is 1 whatever the embeddings), or a side whose rows are all equal as the float32
    unit rows the similarities come from (a collapsed space: every neighbour set is a tie).
    k < 1, zero rows (no direction), NaN or inf raise ValueError.
    """
    check_rows("mutual_knn", nonzero=True, x=x, y=y)
    if k < 1:
        raise ValueError(f"mutual_knn: k must be at least 1, got {k}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"mutual_knn: {x.shape[0]} rows vs {y.shape[0]}: rows must be the same samples")
    if k >= x.shape[0] - 1:
        return float("nan")
    return _mutual_knn(_unit(x, torch.float32), _unit(y, torch.float32), k, tile=tile)


def _mutual_knn(a: torch.Tensor, b: torch.Tensor, k: int, *, tile: int = 1024) -> float:
    """mutual_knn of unit float32 rows (k ≥ 1)."""
    n = a.shape[0]
    if k >= n - 1:
        return float("nan")
    if bool((a == a[:1]).all()) or bool((b == b[:1]).all()):  # equal rows: equal (tied) similarities
        return float("nan")
    total = 0.0
    with torch.no_grad():
        for i0 in range(0, n, tile):
            rows = slice(i0, min(i0 + tile, n))
            na, nb = _knn(a, rows, k), _knn(b, rows, k)
            total += float((na.unsqueeze(2) == nb.unsqueeze(1)).any(2).sum())
    return total / (n * k)


# ---------------------------------------------------------------------------------------------
# inter-modal deviation


def modality_gap(image: torch.Tensor, text: torch.Tensor) -> float:
    """Modality gap ‖mean_i I_i − mean_j T_j‖ (unit rows; every caption counts in the text mean).
    NaN when a side has no rows (no mean); zero rows (no direction), NaN or inf raise ValueError."""
    check_rows("modality_gap", nonzero=True, image=image, text=text)
    return _modality_gap(_unit(image), _unit(text))


def _modality_gap(image: torch.Tensor, text: torch.Tensor) -> float:
    """modality_gap of unit float64 rows."""
    return float((image.mean(0) - text.mean(0)).norm())


def _per_image(values: torch.Tensor, pair_image: torch.Tensor, n_images: int) -> torch.Tensor:
    """Mean of per-caption values over each image's captions."""
    total = torch.zeros(n_images, dtype=torch.float64).index_add_(0, pair_image, values.double())
    count = torch.zeros(n_images, dtype=torch.float64).index_add_(0, pair_image, torch.ones_like(values, dtype=torch.float64))
    return total / count.clamp(min=1)


def inter_modal_deviation(image_a: torch.Tensor, text_a: torch.Tensor, image_b: torch.Tensor,
                          text_b: torch.Tensor, caption_image: torch.Tensor | None = None, *,
                          rotations: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
    """How far the two spaces rotate out of step from a to b. Pairs are (image caption_image[c], text c).

    - mismatch δ_c = |θ^I_{caption_image[c]} − θ^T_c| (θ = `rotation_angles` a → b), degrees;
    - alignment drift Δφ_c = φ^b_c − φ^a_c, φ_c = arccos⟨I_{caption_image[c]}, T_c⟩ (positive: apart);
    - desynchronisation: eigen-angles of R_Iᵀ R_T (`procrustes` rotations a → b per modality), with
      their mean and max;
    - modality gap ‖mean(I) − mean(T)‖ at a and at b.
    `rotations` = (R_I, R_T) if already computed. Identical checkpoints give δ = Δφ = 0 and, as
    R_I = R_T = I there (`procrustes`), desync angles of about 10⁻⁶° (rounding). Zero rows (no
    direction), NaN or inf raise ValueError.
    """
    check_rows("inter_modal_deviation", nonzero=True, image_a=image_a, text_a=text_a, image_b=image_b,
               text_b=text_b)
    units = tuple(map(_unit, (image_a, text_a, image_b, text_b)))
    for name, (x, y) in (("image", (units[0], units[2])), ("text", (units[1], units[3]))):
        if x.shape != y.shape:
            raise ValueError(f"inter_modal_deviation: {name} shapes differ {tuple(x.shape)} vs {tuple(y.shape)}")
    if rotations is not None:
        rotations = tuple(r.double() for r in rotations)
    return _deviation(*units, _pair_index(caption_image, image_a.shape[0], text_a.shape[0]), rotations=rotations)


def _deviation(ia: torch.Tensor, ta: torch.Tensor, ib: torch.Tensor, tb: torch.Tensor, pair_image: torch.Tensor, *,
               rotations: tuple[torch.Tensor, torch.Tensor] | None = None, theta: tuple | None = None,
               gaps: bool = True) -> dict:
    """inter_modal_deviation of unit float64 rows; `theta` = (image, text) rotation angles a → b if
    already computed; without `gaps`, no modality gaps."""
    theta_i, theta_t = theta if theta is not None else (_angles(ia, ib), _angles(ta, tb))
    mismatch = (theta_i[pair_image] - theta_t).abs()
    phi_a = _angles(ia[pair_image], ta)
    phi_b = _angles(ib[pair_image], tb)
    r_i, r_t = rotations if rotations is not None else (_procrustes_rotation(ia, ib), _procrustes_rotation(ta, tb))
    desync = _eigen_angles(r_i.T @ r_t)
    out = {"mismatch": mismatch, "alignment_drift": phi_b - phi_a, "phi_a": phi_a, "phi_b": phi_b,
           "desync_spectrum": desync, "desync_mean": float(desync.mean()), "desync_max": float(desync.max())}
    if gaps:
        out.update(modality_gap_a=_modality_gap(ia, ta), modality_gap_b=_modality_gap(ib, tb))
    return out


#: disorder_scalars' keys: the Spatial Disorder numbers a series of traces is read by
DISORDER_SCALARS = ("rotation_image", "rotation_text", "desync", "alignment_drift")


def disorder_scalars(a, b, *, caption_image: torch.Tensor | None = None) -> dict:
    """The domain-level Spatial Disorder numbers of one probe set from a to b, as the headline reports
    them (figures.summary.pair_numbers): mean rotation angle per modality, desynchronisation (mean
    eigen-angle of R_Iᵀ R_T) and mean alignment drift, in degrees. The cheap part of
    `spatial_disorder` (no topology, no flips), for the many traces of a series; `a`, `b`:
    `DomainEmbeddings` or (image, text[, caption_image]) tuples of the same samples."""
    return disorder_scalars_series(a, [b], caption_image=caption_image)[0]


def disorder_scalars_series(a, bs: list, *, caption_image: torch.Tensor | None = None) -> list[dict]:
    """[disorder_scalars(a, b) for b in bs], computed together on stacked rows (a fine series: one
    reference against every later trace, hundreds of small SVDs that one batched call does)."""
    if not bs:
        return []
    image_a, text_a, ci = _parts(a, caption_image)
    parts = [_parts(b, caption_image) for b in bs]
    if image_a.shape[0] == 0 or text_a.shape[0] == 0:  # the mean of nothing would be NaN, not a measure
        raise ValueError("disorder_scalars: no rows; at least one pair is needed")
    shapes = {(tuple(i.shape), tuple(t.shape)) for i, t, _ in parts}
    if shapes != {(tuple(image_a.shape), tuple(text_a.shape))}:
        raise ValueError(f"disorder_scalars: shapes differ {tuple(image_a.shape)}, {tuple(text_a.shape)} vs "
                         + "; ".join(f"{i}, {t}" for i, t in sorted(shapes)))
    image_b, text_b = torch.stack([i for i, _, _ in parts]), torch.stack([t for _, t, _ in parts])
    check_rows("disorder_scalars", nonzero=True, image_a=image_a, text_a=text_a, image_b=image_b.flatten(0, 1),
               text_b=text_b.flatten(0, 1))
    ia, ta, ib, tb = map(_unit, (image_a, text_a, image_b, text_b))
    pair_image = _pair_index(ci if ci is not None else parts[0][2], ia.shape[0], ta.shape[0])
    rotation_image, rotation_text = _angles(ia, ib).mean(-1), _angles(ta, tb).mean(-1)
    drift = (_angles(ib[:, pair_image], tb) - _angles(ia[pair_image], ta)).mean(-1)
    q = _procrustes_rotations(ia, ib).mT @ _procrustes_rotations(ta, tb)
    # mean eigen-angle of each R_Iᵀ R_T (_eigen_angles, batched)
    desync = (torch.acos(torch.linalg.eigvalsh(0.5 * (q + q.mT)).clamp(-1.0, 1.0)) * DEG).mean(-1)
    return [{"rotation_image": float(rotation_image[t]), "rotation_text": float(rotation_text[t]),
             "desync": float(desync[t]), "alignment_drift": float(drift[t])} for t in range(len(bs))]


# ---------------------------------------------------------------------------------------------
# flips: what the movement does to retrieval


def roc_auc(labels: torch.Tensor, scores: torch.Tensor) -> float | None:
    """ROC AUC of `scores` for binary `labels`, as the Mann–Whitney statistic over average ranks
    (scipy's rankdata): AUC = (Σ rank of the positives − n₁(n₁+1)/2) / (n₁ n₀), so a tie between a
    positive and a negative counts one half, as in scikit-learn's roc_auc_score (tested against it).
    None when only one class is present (or nothing at all), where the AUC is undefined. NaN or inf
    scores raise ValueError."""
    # Not roc_auc_score: its input validation costs about 4 ms a call, a third of a spatial_disorder
    # pair on the probe sets of a study, where rankdata costs 0.15 ms for the same number.
    from scipy.stats import rankdata

    check_rows("roc_auc", scores=scores)
    y = torch.as_tensor(labels).cpu().numpy().astype(bool).ravel()
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(torch.as_tensor(scores).detach().double().cpu().numpy().ravel())
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def flips(image_a: torch.Tensor, text_a: torch.Tensor, image_b: torch.Tensor, text_b: torch.Tensor,
          caption_image: torch.Tensor | None = None, *, ranks_a=None, ranks_b=None, deviation: dict | None = None,
          backend: str = "auto") -> dict:
    """R@1 flips from a to b and how well deviation predicts them, per direction.

    For direction x ∈ {image_to_text, text_to_image}: correct = (rank of the positive == 0);
    forgotten = |correct_a ∧ ¬correct_b| / |correct_a|, learned = |¬correct_a ∧ correct_b| / |¬correct_a|;
    auc_alignment_drift / auc_mismatch = ROC AUC (`roc_auc`) with which Δφ / δ predict "forgotten"
    among queries correct at a (an image query scores the mean over its captions); None when
    that set holds only one class. forgotten is NaN when no query is correct at a, learned when
    every query is (0/0). Masks `forgotten_mask` / `learned_mask` are returned too.
    Zero rows (no direction), NaN or inf raise ValueError.
    """
    check_rows("flips", nonzero=True, image_a=image_a, text_a=text_a, image_b=image_b, text_b=text_b)
    pair_image = _pair_index(caption_image, image_a.shape[0], text_a.shape[0])
    ci = None if caption_image is None else pair_image
    # ranks on the embeddings as given (as `retrieval_metrics` computes them)
    if ranks_a is None:
        ranks_a = kernels.retrieval_ranks(image_a.float(), text_a.float(), ci, backend=backend)
    if ranks_b is None:
        ranks_b = kernels.retrieval_ranks(image_b.float(), text_b.float(), ci, backend=backend)
    if deviation is None:
        deviation = inter_modal_deviation(image_a, text_a, image_b, text_b, caption_image)
    n_img = image_a.shape[0]
    scores = {
        "image_to_text": (_per_image(deviation["alignment_drift"], pair_image, n_img),
                          _per_image(deviation["mismatch"], pair_image, n_img)),
        "text_to_image": (deviation["alignment_drift"], deviation["mismatch"]),
    }
    out = {}
    for k, direction in enumerate(("image_to_text", "text_to_image")):
        ca, cb = ranks_a[k].cpu() == 0, ranks_b[k].cpu() == 0
        forgotten, learned = ca & ~cb, ~ca & cb
        drift_score, mismatch_score = scores[direction]
        out[direction] = {
            "queries": int(ca.numel()), "correct_a": int(ca.sum()), "correct_b": int(cb.sum()),
            "n_forgotten": int(forgotten.sum()), "n_learned": int(learned.sum()),
            "forgotten": _share(forgotten.sum(), ca.sum()), "learned": _share(learned.sum(), (~ca).sum()),
            "auc_alignment_drift": roc_auc(forgotten[ca], drift_score[ca]),
            "auc_mismatch": roc_auc(forgotten[ca], mismatch_score[ca]),
            "forgotten_mask": forgotten, "learned_mask": learned,
        }
    return out


def _share(part, whole) -> float:
    """part / whole, NaN for 0/0 (a share of nothing)."""
    return float(part) / int(whole) if int(whole) else float("nan")


# ---------------------------------------------------------------------------------------------
# everything for one checkpoint pair


def _parts(x, caption_image):
    if hasattr(x, "image"):
        return x.image, x.text, getattr(x, "caption_image", caption_image)
    image, text = x[0], x[1]
    return image, text, (x[2] if len(x) > 2 else caption_image)


def spatial_disorder(a, b, *, caption_image: torch.Tensor | None = None, k: int = 10,
                     exact_limit: int = 20_000, sample_pairs: int = 10_000_000, seed: int = 0,
                     ranks_a=None, ranks_b=None, backend: str = "auto", workers: int | None = None) -> dict:
    """Every Spatial Disorder measure for one checkpoint pair a → b, as a JSON-ready dict.

    `a`, `b`: `DomainEmbeddings` (or (image, text[, caption_image]) tuples) of the same probe set.
    Keys: rotation, topology_drift, procrustes, cka, mutual_knn (each {"image", "text"}),
    deviation and flips; per-sample values appear as `summarize` summaries (mean, quantiles,
    histogram). The schema is documented in docs/analysis_schema.md. Undefined values (see each
    measure) are NaN; zero rows (no direction), NaN or inf raise ValueError.
    """
    image_a, text_a, ci = _parts(a, caption_image)
    image_b, text_b, ci_b = _parts(b, caption_image)
    check_rows("spatial_disorder", nonzero=True, image_a=image_a, text_a=text_a, image_b=image_b, text_b=text_b)
    ci = ci if ci is not None else ci_b
    if k < 1:
        raise ValueError(f"spatial_disorder: k must be at least 1, got {k}")
    out = {"n_images": int(image_a.shape[0]), "n_texts": int(text_a.shape[0])}
    rot, drift, proc, cka, knn = {}, {}, {}, {}, {}
    rotations, theta, unit = [], [], {}
    for name, x, y in (("image", image_a, image_b), ("text", text_a, text_b)):
        u, v = _unit(x), _unit(y)
        if u.shape != v.shape:
            raise ValueError(f"spatial_disorder: {name} shapes differ {tuple(u.shape)} vs {tuple(v.shape)}")
        unit[name] = (u, v)
        theta.append(_angles(u, v))
        rot[name] = summarize(theta[-1], hist=True)
        u32, v32 = _unit(x, torch.float32), _unit(y, torch.float32)
        drift[name] = _topology_drift(u32, v32, exact_limit=exact_limit, sample_pairs=sample_pairs, seed=seed,
                                      workers=workers)
        p = _procrustes(u, v)
        rotations.append(p.rotation)
        proc[name] = {"rigid_share": p.rigid_share, "spectrum": summarize(p.spectrum, hist=True),
                      "residual": summarize(p.residual_angles)}
        cka[name] = _linear_cka(u, v)
        knn[name] = _mutual_knn(u32, v32, k)
    pair_image = _pair_index(ci, image_a.shape[0], text_a.shape[0])
    (ia, ib), (ta, tb) = unit["image"], unit["text"]
    dev = _deviation(ia, ta, ib, tb, pair_image, rotations=tuple(rotations), theta=tuple(theta))
    fl = flips(image_a, text_a, image_b, text_b, ci, ranks_a=ranks_a, ranks_b=ranks_b, deviation=dev, backend=backend)
    out.update({"rotation": rot, "topology_drift": drift, "procrustes": proc, "cka": cka, "mutual_knn": knn})
    out["deviation"] = {
        "mismatch": summarize(dev["mismatch"]),
        "alignment_drift": summarize(dev["alignment_drift"], signed=True),
        "desync": {"mean": dev["desync_mean"], "max": dev["desync_max"], "spectrum": summarize(dev["desync_spectrum"], hist=True)},
        "modality_gap": {"a": dev["modality_gap_a"], "b": dev["modality_gap_b"]},
    }
    out["flips"] = {d: {k2: v for k2, v in f.items() if not k2.endswith("_mask")} for d, f in fl.items()}
    return out
