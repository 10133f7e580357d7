"""similarity / topk / retrieval_ranks (kernels/ranking.py, ranking_torch.py, ranking_triton.py
and the ranking formulas of reference.py): tiled torch and Triton (interpreter) against the dense
reference (docs/definitions.md, "Retrieval ranks and ties"). Small shapes, deliberately not
multiples of the block sizes."""
from __future__ import annotations

import functools
import inspect

import pytest
import torch

import geomlab.kernels as K
from geomlab.kernels import ranking_native, ranking_torch, reference

BACKENDS = ["torch", "triton"]
DTYPES = [torch.float32, torch.bfloat16]


def exact_features(n, d, seed, dup=()):
    """Entries in {-2..2}/8: every dot product is exact in fp32 whatever the summation order, in
    fp32 and bf16, so backends must agree bit for bit and ties are real ties. `dup` = (src, dst)
    row copies for duplicate rows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-2, 3, (n, d), generator=g).float() / 8
    for src, dst in dup:
        x[dst] = x[src]
    return x


def unit(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)


def expected_topk(q, g, k):
    """Dense top-k ordered by (score desc, index asc)."""
    s = reference.similarity(q, g)
    order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k]
    return torch.gather(s, 1, order), order


def topk_fn(backend, small_tiles):
    if backend == "torch" and small_tiles:  # tiles narrower than k, ragged edges
        return lambda q, g, k: ranking_torch.topk(q, g, k, block_q=8, block_g=7)
    return lambda q, g, k: K.topk(q, g, k, backend=backend)


def ranks_fn(backend, small_tiles):
    if backend == "torch" and small_tiles:
        return lambda i, t, ci=None: ranking_torch.retrieval_ranks(i, t, ci, block_q=8, block_g=7)
    return lambda i, t, ci=None: K.retrieval_ranks(i, t, ci, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_similarity(backend, dtype):
    a, b = unit(37, 20, 0).to(dtype), unit(29, 20, 1).to(dtype)
    out = K.similarity(a, b, backend=backend)
    assert out.dtype == torch.float32 and out.shape == (37, 29)
    torch.testing.assert_close(out, reference.similarity(a, b), atol=1e-5, rtol=1e-5)
    e, f = exact_features(19, 33, 2).to(dtype), exact_features(40, 33, 3).to(dtype)
    assert torch.equal(K.similarity(e, f, backend=backend), reference.similarity(e, f))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("small_tiles", [False, True])
def test_topk_ties_exact(backend, dtype, small_tiles):
    q = exact_features(21, 20, 4, dup=[(0, 3), (5, 6)]).to(dtype)
    g = exact_features(45, 20, 5, dup=[(3, 5), (3, 20), (10, 44)]).to(dtype)
    fn = topk_fn(backend, small_tiles)
    for k in (1, 5, 20, 45):  # 20 > the tile widths (7 for torch here, 16 for the interpreter)
        v, i = fn(q, g, k)
        ev, ei = expected_topk(q, g, k)
        assert v.dtype == torch.float32 and i.dtype == torch.int64 and v.shape == (21, k)
        assert torch.equal(v, ev), k
        assert torch.equal(i, ei), k  # ties: smaller gallery index first
        rv, ri = reference.topk(q, g, k)  # dense torch.topk: same values, ties in any order
        assert torch.equal(v, rv)


@pytest.mark.parametrize("block_g", [64, 150, 333])
def test_topk_torch_segments(block_g):
    """The torch backend's segment pruning (64-wide column segments + a ragged tail) on tiles
    wide enough to use it, with many exact ties."""
    q = exact_features(60, 12, 17, dup=[(0, 1)])
    g = exact_features(333, 12, 18, dup=[(7, 100), (7, 250), (7, 332)])
    for k in (1, 2, 3, 70, 200):  # small k: the warm-up bound comes from segment maxima
        v, i = ranking_torch.topk(q, g, k, block_q=25, block_g=block_g)
        ev, ei = expected_topk(q, g, k)
        assert torch.equal(v, ev) and torch.equal(i, ei), k


def test_triton_topk_beyond_the_kernel_k(monkeypatch):
    """k above the top-k kernel's register list: sorted row chunks of the similarity matrix."""
    from geomlab.kernels import ranking_triton

    monkeypatch.setattr(ranking_triton, "TOPK_KERNEL_MAX_K", 4)
    monkeypatch.setattr(ranking_triton, "CHUNK_ELEMS", 45 * 8)  # 8 query rows per chunk
    q = exact_features(21, 20, 4, dup=[(0, 3)])
    g = exact_features(45, 20, 5, dup=[(3, 5), (3, 20)])
    for k in (5, 45):
        v, i = K.topk(q, g, k, backend="triton")
        ev, ei = expected_topk(q, g, k)
        assert torch.equal(v, ev) and torch.equal(i, ei), k


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_random(backend):
    q, g = unit(33, 24, 6), unit(70, 24, 7)
    v, i = K.topk(q, g, 10, backend=backend)
    rv, ri = reference.topk(q, g, 10)
    torch.testing.assert_close(v, rv, atol=1e-5, rtol=1e-5)
    assert torch.equal(i, ri)
    with pytest.raises(ValueError):
        K.topk(q, g, 71, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("small_tiles", [False, True])
def test_ranks_one_caption(backend, dtype, small_tiles):
    image = exact_features(35, 20, 8, dup=[(1, 2), (4, 30)]).to(dtype)
    text = exact_features(35, 20, 9, dup=[(0, 7), (7, 8)]).to(dtype)
    text[12] = image[12]  # a strong positive
    got = ranks_fn(backend, small_tiles)(image, text)
    want = reference.retrieval_ranks(image, text)
    assert all(x.dtype == torch.int64 for x in got)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    u, w = unit(40, 24, 10), unit(40, 24, 11)
    got, want = ranks_fn(backend, small_tiles)(u, w), reference.retrieval_ranks(u, w)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("small_tiles", [False, True])
def test_ranks_multi_caption(backend, dtype, small_tiles):
    n_img, n_txt = 23, 50
    g = torch.Generator().manual_seed(12)
    ci = torch.randint(0, n_img - 1, (n_txt,), generator=g)  # image 22 has no caption
    image = exact_features(n_img, 20, 13, dup=[(0, 5)]).to(dtype)
    text = exact_features(n_txt, 20, 14, dup=[(2, 9), (2, 40)]).to(dtype)
    got = ranks_fn(backend, small_tiles)(image, text, ci)
    want = reference.retrieval_ranks(image, text, ci)
    assert got[0].shape == (n_img,) and got[1].shape == (n_txt,)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert got[0][22] == n_txt


def test_ranks_errors():
    with pytest.raises(ValueError):
        K.retrieval_ranks(unit(5, 8, 0), unit(6, 8, 1), backend="torch")
    with pytest.raises(ValueError):
        K.retrieval_ranks(unit(5, 8, 0), unit(6, 8, 1), torch.tensor([0, 1, 2, 3, 4, 5]), backend="torch")
    with pytest.raises(ValueError):
        K.similarity(unit(5, 8, 0), unit(5, 9, 1), backend="torch")


def test_auto_backend_on_cpu():
    q, g = unit(30, 16, 15), unit(50, 16, 16)
    v, i = K.topk(q, g, 3)  # auto → torch on CPU
    assert torch.equal(i, ranking_torch.topk(q, g, 3)[1])


def test_public_signatures():
    assert str(inspect.signature(K.similarity)) == "(a, b, *, backend='auto')"
    assert str(inspect.signature(K.topk)) == "(queries, gallery, k, *, backend='auto')"
    assert str(inspect.signature(K.retrieval_ranks)) == "(image, text, caption_image=None, *, backend='auto')"


def test_triton_refuses_float64():
    a = unit(5, 8, 0).double()
    for call in (lambda: K.similarity(a, a, backend="triton"), lambda: K.topk(a, a, 2, backend="triton"),
                 lambda: K.retrieval_ranks(a, a, backend="triton")):
        with pytest.raises(TypeError, match=r"torch\.float64.*backend='torch'"):
            call()


def test_torch_worker_threads():
    """Enough query rows for several worker threads: the same results as one block, exactly, and
    torch's thread count is restored afterwards."""
    threads = torch.get_num_threads()
    q, g = exact_features(600, 16, 19, dup=[(0, 599)]), exact_features(530, 16, 20, dup=[(1, 529)])
    v, i = ranking_torch.topk(q, g, 7)
    ev, ei = expected_topk(q, g, 7)
    assert torch.equal(v, ev) and torch.equal(i, ei)
    image, text = exact_features(600, 16, 21), exact_features(600, 16, 22, dup=[(3, 4)])
    got, want = ranking_torch.retrieval_ranks(image, text), reference.retrieval_ranks(image, text)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize("data", ["random", "exact_ties", "near_duplicates"])
def test_topk_bf16_candidate_pass_is_exact(data):
    """The bf16 pass of ranking_torch.topk (candidates from bf16 GEMMs, rescored in fp32, unsafe rows
    recomputed) returns the fp32 pass's top-k: same values, and the same indices wherever scores
    are not tied to within fp32 rounding."""
    g = torch.Generator().manual_seed(3)
    if data == "exact_ties":  # entries in {-2..2}/8: every score is exact in bf16 and fp32 alike
        q = torch.randint(-2, 3, (300, 24), generator=g).float() / 8
        gal = torch.randint(-2, 3, (700, 24), generator=g).float() / 8
    else:
        q = torch.nn.functional.normalize(torch.randn(300, 40, generator=g), dim=1)
        gal = torch.nn.functional.normalize(torch.randn(700, 40, generator=g), dim=1)
        if data == "near_duplicates":  # scores closer than the bf16 error: forces the exact fallback
            gal[:200] = torch.nn.functional.normalize(gal[0] + 1e-3 * torch.randn(200, 40, generator=g), dim=1)
            q[:40] = torch.nn.functional.normalize(gal[0] + 1e-3 * torch.randn(40, 40, generator=g), dim=1)
    stats = {}
    v1, i1 = ranking_torch.topk(q, gal, 7, approx=True, block_g=256, stats=stats)
    v0, i0 = ranking_torch.topk(q, gal, 7, approx=False, block_g=256)
    torch.testing.assert_close(v1, v0, rtol=0, atol=1e-6)
    if data == "near_duplicates":
        assert stats["recomputed"] > 0  # the fp32 pass decided those queries
    else:
        assert torch.equal(i1, i0)
    # every returned index really has the returned score
    exact = (q.unsqueeze(1) * gal[i1]).sum(-1)
    torch.testing.assert_close(exact, v1, rtol=0, atol=1e-6)


def near(x, eps, seed):
    """x moved by about eps: its scores differ from x's by about eps (|eps| ≥ 1e-4 is far more
    than fp32 rounding; up to 1e-2 spans the bf16 error)."""
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(x + eps * torch.randn(x.shape, generator=g), dim=-1)


@pytest.mark.parametrize("captions_per_image", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_ranks_bf16_tiles_resolve_ties_exactly(captions_per_image, dtype):
    """The bf16 tiles of ranking_torch.retrieval_ranks against near-ties (scores within the bf16
    error of a positive, in both directions) and exact ties, with captions close to their image
    (positive scores ≈ 0.9, others ≈ 0: the case the bf16 pass is for). The tiles stay bf16 (small
    tiles whose band holds sibling captions too may be recounted from int8 levels), the band entries are
    decided by exact scores (stats["resolved"]), and the ranks equal the dense fp32 reference."""
    image = unit(300, 32, 23)
    image[40:48] = near(image[39], torch.logspace(-4, -2, 8).unsqueeze(1), 1)  # caption 39's near-ties
    image[60] = image[61]  # exact tie between images
    ci = torch.arange(300).repeat_interleave(captions_per_image)
    text = torch.nn.functional.normalize(image[ci] + 0.5 * unit(ci.numel(), 32, 2), dim=1)
    text[7] = text[5]  # exact tie with caption 5 (and 7)
    text[20] = near(text[21], 1e-4, 3)  # a near-tie against caption 21's positive
    image, text = image.to(dtype), text.to(dtype)
    cap = ci if captions_per_image > 1 else None
    want = reference.retrieval_ranks(image, text, cap)
    for block_q, block_g in ((None, None), (64, 100)):  # one tile; ragged, padded tiles
        stats = {}
        got = ranking_torch.retrieval_ranks(image, text, cap, block_q=block_q, block_g=block_g,
                                            approx=True, stats=stats)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (block_q, block_g)
        assert stats["bf16_tiles"] > 0 and stats["fp32_tiles"] == 0 and stats["resolved"] >= 4, stats
        assert block_q or stats["int8_tiles"] == 0, stats


def test_ranks_bf16_tiles_fall_back_to_int8():
    """Unrelated random features put every positive in the bulk of its row: the bf16 tiles hold
    too many ambiguous entries (d = 256: about 4% of them, above RESOLVE_MAX_FRACTION) and are
    recounted from int8 levels, whose band is far narrower, with the same exact ranks."""
    image, text = unit(300, 256, 24), unit(300, 256, 25)
    text[9] = text[4]
    stats = {}
    got = ranking_torch.retrieval_ranks(image, text, approx=True, block_q=128, stats=stats)
    want = reference.retrieval_ranks(image, text)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert stats["int8_tiles"] == stats["tiles"] > 1 and stats["bf16_tiles"] == 0, stats
    assert 2 <= stats["band_i2t"] + stats["band_t2i"] < 0.01 * 2 * 300 * 300, stats  # the tie, and few more


@pytest.mark.parametrize("d", [24, 256])
def test_bf16_bounds_hold(d):
    """The bounds the bf16 passes rest on, checked against this machine's bf16 GEMM: |bf16 score −
    exact score| ≤ ranking_torch._bf16_error + the rounding of the accumulator to bf16, and the
    rank bands of both tile dtypes misplace no entry (every entry outside [lo, hi] is on the same
    side of the positive's exact score, which is what exact ranks need)."""
    g = torch.Generator().manual_seed(d)
    a = torch.randn(200, d, generator=g) * torch.rand(200, 1, generator=g) * 4
    b = torch.nn.functional.normalize(torch.randn(300, d, generator=g), dim=1)
    b[:50] = near(b[50:100] * 3, 1e-3, 4)
    ab, ra = ranking_torch._bf16_residuals(a)
    bb, rb = ranking_torch._bf16_residuals(b)
    approx = torch.mm(ab, bb.T)
    exact = a.double() @ b.double().T
    bound = ranking_torch._bf16_error(a.norm(dim=1), ra, b.norm(dim=1).max(), rb.max(), d).double()
    assert ((approx.double() - exact).abs() <= bound[:, None] + 2.0 ** -8 * approx.double().abs()).all()
    exact = exact.float()  # exact scores rounded to fp32, the ones ranks are decided by
    pos = exact.diagonal()
    na, nb = a.norm(dim=1), b.norm(dim=1)
    widths = (ranking_torch._bf16_width(pos, na, ra, nb, rb, d),
              ranking_torch._fp32_error(na.double(), nb.max().double(), d))
    for tile, w in zip((approx, a @ b.T), widths):
        lo, hi = ranking_torch._bands(pos, w, tile.dtype)
        lo, hi = lo[:200, None], hi[:200, None]
        assert ((tile <= hi) | (exact > pos[:, None])).all() and ((tile >= lo) | (exact < pos[:, None])).all()
        assert (tile >= lo).logical_and(tile <= hi).float().mean() < 0.1  # the band is narrow


@pytest.mark.parametrize("d", [24, 256, 1100])
@pytest.mark.parametrize("native", [False, True])
def test_int8_bounds_hold(d, native):
    """The bound the int8 tiles rest on, against this machine's int8 GEMMs and the widening
    (torch, or C: its compiler may fuse the fp32 roundings): |int8 tile score − exact
    score| ≤ ranking_torch._int8_error, for rows of very different norms, a zero row, a row with
    one dominant entry, near-parallel rows, and d up to where q₁·p₁ no longer fits fp32 exactly
    (1100 · 127² > 2²⁴); the bands misplace no entry and are narrow."""
    g = torch.Generator().manual_seed(d)
    a = torch.randn(200, d, generator=g) * torch.rand(200, 1, generator=g) * 4
    a[3] = 0
    a[4, 0] = 1e3
    b = torch.nn.functional.normalize(torch.randn(300, d, generator=g), dim=1)
    b[:50] = near(b[50:100] * 3, 1e-3, 4)
    ia = ranking_torch._int8_split(a, caption_side=False)
    ib = ranking_torch._int8_split(b, caption_side=True)
    g1, g2 = torch.empty(200, 300, dtype=torch.int32), torch.empty(200, 300, dtype=torch.int32)
    tile = torch.empty(200, 301)[:, :300]  # a padded tile's view, as retrieval_ranks passes it
    kernels = ranking_native.native_kernels()
    assert kernels is not None
    widen = (functools.partial(ranking_native.widen, kernels, float(ranking_torch.INT8_SPLIT)) if native
             else ranking_torch._widen)
    ranking_torch._int8_tile(ia, ib, slice(0, 200), slice(0, 300), g1, g2, tile, widen)
    exact = a.double() @ b.double().T
    na, nb = a.norm(dim=1), b.norm(dim=1)
    bound = ranking_torch._int8_error(ia, na, ib, nb)
    assert ((tile.double() - exact).abs() <= bound[:, None]).all()
    exact = exact.float()
    pos = exact.diagonal()
    lo, hi = ranking_torch._bands(pos, bound[:200], torch.float32)
    lo, hi = lo[:200, None], hi[:200, None]
    assert ((tile <= hi) | (exact > pos[:, None])).all() and ((tile >= lo) | (exact < pos[:, None])).all()
    unit_rows = torch.arange(200) != 4
    assert (tile >= lo).logical_and(tile <= hi)[unit_rows].float().mean() < 0.02  # narrow: the positives and few more


def brute_force_ranks(image, text):
    """Ranks (one caption per image) from every score computed in fp64 and rounded to fp32 (the
    scores retrieval_ranks decides by), counted entry by entry: higher, or equal with a smaller index."""
    s = (image.double() @ text.double().T).float()
    pos = s.diagonal()
    idx = torch.arange(s.shape[0])
    i2t = ((s > pos[:, None]) | ((s == pos[:, None]) & (idx[None, :] < idx[:, None]))).sum(1)
    t2i = ((s > pos[None, :]) | ((s == pos[None, :]) & (idx[:, None] < idx[None, :]))).sum(0)
    return i2t, t2i


def probe_with_ties(kind):
    """300 images and captions of a benchmark data kind (positives at median rank 0, ~30, ~1% or
    unrelated), with exact ties (a duplicated caption, a duplicated image) and near-ties at 1e-4 …
    1e-2 (closer than the bf16 error, some closer than the fp32 one's reach)."""
    from geomlab.benchmarks.common import probe_pair

    image, text = probe_pair(kind, 300, 32, seed=5)
    image[40:48] = near(image[39], torch.logspace(-4, -2, 8).unsqueeze(1), 1)
    image[60] = image[61]
    text[7] = text[5]  # caption 7 ties image 5's positive exactly
    text[20] = near(text[21], 1e-4, 3)
    text[100:104] = near(text[99], torch.logspace(-5, -3, 4).unsqueeze(1), 6)
    return image, text


@pytest.mark.parametrize("kind", ["rank0", "rank30", "rank1%", "unrelated"])
@pytest.mark.parametrize("path", ["fp32", "bf16-resolved", "int8-recount"])
@pytest.mark.parametrize("counting", ["torch", "native"])
def test_ranks_every_path_on_every_data_kind(kind, path, counting, monkeypatch):
    """ranking_torch.retrieval_ranks forced down each path on each kind of benchmark data, against
    the brute-force fp64 count: fp32 tiles; bf16 tiles whose bands are all resolved (fp32 step,
    then exact); bf16 tiles all recounted from int8 levels (RESOLVE_MAX_FRACTION inf / 0); and
    either way of counting and scoring a tile: torch passes and eager scores (no C kernels), or the
    C kernels. Ragged, padded tiles of 64 × 100."""
    if counting == "torch":
        monkeypatch.setattr(ranking_native, "native_kernels", lambda: None)
    else:
        assert ranking_native.native_kernels() is not None  # this machine builds the C kernels
    if path != "fp32":
        monkeypatch.setattr(ranking_torch, "RESOLVE_MAX_FRACTION", float("inf") if path == "bf16-resolved" else 0.0)
    image, text = probe_with_ties(kind)
    stats = {}
    got = ranking_torch.retrieval_ranks(image, text, block_q=64, block_g=100, approx=path != "fp32", stats=stats)
    want = brute_force_ranks(image, text)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    band = stats["band_i2t"] + stats["band_t2i"]
    assert stats["resolved"] == stats["resolved_i2t"] + stats["resolved_t2i"] >= 1, stats  # the exact tie
    assert int(got[0].sum() + got[1].sum()) > band, stats  # entries counted as surely above
    if path == "fp32":
        assert stats["fp32_tiles"] == stats["tiles"] and stats["resolved"] == band, stats
    elif path == "bf16-resolved":  # the fp32 step decides most band entries, the exact scores the rest
        assert stats["bf16_tiles"] == stats["tiles"] and stats["resolved"] < band, stats
    else:
        assert stats["int8_tiles"] == stats["tiles"] and stats["resolved"] <= band, stats


def test_fp32_step_decides_only_what_the_fp32_bound_allows():
    """The first step of band resolution in torch: gathered fp32 dot products lie within
    `_fp32_error` of the exact scores rounded to fp32 (rows of very different norms, near-parallel
    pairs), so every pair it calls won has an exact score above pos and every pair it decides
    otherwise one below; the pairs within the bound, the exact ties among them, stay undecided."""
    g = torch.Generator().manual_seed(9)
    a = torch.randn(400, 256, generator=g) * torch.rand(400, 1, generator=g) * 8
    b = torch.cat([near(a[:200] / 3, 1e-4, 10), torch.randn(200, 256, generator=g)])
    rows, cols = torch.arange(400).repeat(2), torch.randint(0, 400, (800,), generator=g)
    exact = ranking_torch._exact_dots(a, b, rows, cols)
    na, nb = a.norm(dim=1), b.norm(dim=1)
    bound = ranking_torch._fp32_error(na[rows], nb[cols], 256)
    f = (a[rows] * b[cols]).sum(1)  # the step's formula
    assert ((f - exact).abs() <= bound).all()
    pos = exact + torch.where(torch.arange(800) % 3 == 0, 0.0, (torch.rand(800, generator=g) - 0.5) * 4 * bound)
    won, undecided = ranking_torch._fp32_step(a, b, rows, cols, pos, na, nb, chunk=300)
    assert (exact[won] > pos[won]).all() and (exact[~won & ~undecided] < pos[~won & ~undecided]).all()
    assert undecided[torch.arange(800) % 3 == 0].all()  # exact ties are never decided in fp32
    assert 0 < int(undecided.sum()) < 800 and int(won.sum()) > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(256, 512), (512, 256)])
def test_band_masks_equal_brute_force(dtype, shape):
    """`_band_masks` (one read of a tile per direction, the torch counting) against an entry-by-
    entry count: #entries > hi per group, and bit k of a group's mask set exactly where its entry k
    lies in [lo, hi], with entries equal to lo and to hi, −inf padding and both directions."""
    g = torch.Generator().manual_seed(3)
    mp, np_ = shape
    s = (torch.randn(mp, np_, generator=g) * 0.1).to(dtype)
    s[:, -40:] = float("-inf")  # padding
    lo_r, hi_r = s[:, :1].clone(), s[:, 1:2].clone()  # entries equal to lo and hi in every row
    lo_r, hi_r = torch.minimum(lo_r, hi_r), torch.maximum(lo_r, hi_r)
    lo_c, hi_c = torch.minimum(s[:1], s[1:2]), torch.maximum(s[:1], s[1:2])
    G = ranking_torch.BAND_GROUP
    for dim, lo, hi in ((1, lo_r, hi_r), (0, lo_c, hi_c)):
        above, mask = ranking_torch._band_masks(s, lo, hi, dim)
        in_band, gt = (s >= lo) & (s <= hi), s > hi
        if dim == 1:  # group j of row i: columns j, j + G', …  (G' = np / BAND_GROUP)
            in_band, gt = in_band.view(mp, G, -1), gt.view(mp, G, -1)
        else:  # group j of column c: rows j·G … j·G + G − 1
            in_band, gt = in_band.view(-1, G, np_), gt.view(-1, G, np_)
        weights = (2 ** torch.arange(G)).view(1, G, 1)
        assert torch.equal(above.long(), gt.sum(1)) and torch.equal(mask.long(), (in_band.long() * weights).sum(1))
        assert int(in_band.sum()) >= s.shape[1 - dim]  # the ties to lo and hi are in the band


def test_native_kernels_are_built_once_into_the_cache(tmp_path, monkeypatch):
    """The C kernels are built into $GEOMLAB_CACHE on first use: one library there and nothing else
    (it is moved into place whole), loaded again by a later call without building."""
    monkeypatch.setenv("GEOMLAB_CACHE", str(tmp_path / "cache"))
    ranking_native.native_kernels.cache_clear()
    try:
        assert ranking_native.native_kernels() is not None
        built = list((tmp_path / "cache").iterdir())
        assert len(built) == 1 and built[0].name.startswith("ranking_native_") and built[0].suffix == ".so", built
        stamp = built[0].stat().st_mtime_ns
        ranking_native.native_kernels.cache_clear()
        assert ranking_native.native_kernels() is not None
        assert list((tmp_path / "cache").iterdir()) == built and built[0].stat().st_mtime_ns == stamp
    finally:
        ranking_native.native_kernels.cache_clear()


def test_ranks_without_a_compiler_warn_and_count_with_torch(tmp_path, monkeypatch):
    """Where no C compiler works, the C kernels cannot be built: retrieval_ranks warns (naming the
    compiler it tried and what to set) and counts with torch passes and eager scores: the same
    ranks, and nothing left in the cache."""
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("GEOMLAB_CACHE", str(tmp_path / "cache"))
    ranking_native.native_kernels.cache_clear()
    try:
        image, text = probe_with_ties("rank30")
        with pytest.warns(RuntimeWarning, match=r"C kernels could not be built.*no-such-cc.*\$GEOMLAB_CACHE"):
            got = ranking_torch.retrieval_ranks(image, text, block_q=64, block_g=100, approx=True)
        want = brute_force_ranks(image, text)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())
    finally:
        ranking_native.native_kernels.cache_clear()


@pytest.mark.parametrize("d", [3, 40, 256, 259])
def test_native_exact_scores_are_the_fp64_scores_rounded_once(d):
    """`ranking_native.exact_scores` against fp64 scores rounded to fp32 (rows of very different
    norms, near-parallel pairs; d below, at and past its 16-lane loop): equal, bar a rare last-bit
    difference where another fp64 summation order rounds the other way; and identical vectors
    score identically wherever they sit."""
    g = torch.Generator().manual_seed(d)
    a = torch.randn(300, d, generator=g) * torch.rand(300, 1, generator=g) * 8
    b = torch.cat([near(a[:150] / 3, 1e-4, d), torch.randn(150, d, generator=g)])
    b[7] = b[5]
    rows, cols = torch.arange(300).repeat(3), torch.randint(0, 300, (900,), generator=g)
    got = ranking_native.exact_scores(ranking_native.native_kernels(), a, b, rows, cols)
    want = (a[rows].double() * b[cols].double()).sum(1)
    assert (got.double() - want).abs().le(2.0 ** -23 * want.abs() + 1e-30).all()
    assert (got == want.float()).float().mean() > 0.99
    every = torch.arange(300)
    with_5, with_7 = (ranking_native.exact_scores(ranking_native.native_kernels(), a, b, every, torch.full((300,), c))
                      for c in (5, 7))
    assert torch.equal(with_5, with_7)  # b[7] = b[5]


def scan_problem(dtype, seed=7):
    """A tile of 37 image rows × 70 caption rows (d = 40) for `scan_tile`, in a wider buffer (row
    stride 75), with everything it takes: captions near their images (caption j near image
    j mod 37), an exact tie (caption 5 = caption 3) and a near-tie; the positive of row i is
    caption i for i < 30, outside the tile (own −1) for the others; of column j, image j for
    j < 30, outside for the others; row 36 and column 69 have none (pos −inf). Bands from the
    tile dtype's bound, so every entry outside its band is on the side of the positive it seems."""
    g = torch.Generator().manual_seed(seed)
    m, n, d = 37, 70, 40
    a = unit(m, d, seed)
    b = torch.nn.functional.normalize(a[torch.arange(n) % m] + 0.7 * torch.randn(n, d, generator=g), dim=1)
    b[5] = b[3]
    b[9] = near(b[10], 1e-4, seed)
    exact = (a.double() @ b.double().T).float()
    own_r = torch.where(torch.arange(m) < 30, torch.arange(m), -1)
    own_c = torch.where(torch.arange(n) < 30, torch.arange(n), -1)
    pos_r = torch.where(own_r >= 0, exact[torch.arange(m), own_r.clamp(min=0)], exact.median(1).values)
    pos_c = torch.where(own_c >= 0, exact[own_c.clamp(min=0), torch.arange(n)], exact.median(0).values)
    pos_r[36], pos_c[69] = float("-inf"), float("-inf")
    na, nb = a.norm(dim=1), b.norm(dim=1)
    buf = torch.full((m, n + 5), float("nan"), dtype=dtype)
    if dtype == torch.bfloat16:
        ab, ra = ranking_torch._bf16_residuals(a)
        bb, rb = ranking_torch._bf16_residuals(b)
        torch.mm(ab, bb.T, out=buf[:, :n])
        w_r = ranking_torch._bf16_width(pos_r, na, ra, nb, rb, d)
        w_c = ranking_torch._bf16_width(pos_c, nb, rb, na, ra, d)
    else:
        torch.mm(a, b.T, out=buf[:, :n])
        w_r, w_c = ranking_torch._fp32_error(na.double(), nb.max().double(), d), ranking_torch._fp32_error(
            nb.double(), na.max().double(), d)
    (lo_r, hi_r), (lo_c, hi_c) = (tuple(x[:len(p)].float() for x in ranking_torch._bands(p, w, dtype))
                                  for p, w in ((pos_r, w_r), (pos_c, w_c)))
    return dict(s=buf[:, :n], bands=(lo_r, hi_r, lo_c, hi_c), own=(own_r, own_c), rows=(a, b), pos=(pos_r, pos_c),
                norms=(na, nb), exact=exact)


def scan_beats(p):
    """`scan_tile`'s `beats` for a scan_problem: exact score higher than the line's positive, or equal
    with a smaller gallery index (a positive outside the tile stands after it)."""
    (own_r, own_c), (pos_r, pos_c), exact = p["own"], p["pos"], p["exact"]
    m, n = exact.shape
    own_r, own_c = torch.where(own_r >= 0, own_r, n), torch.where(own_c >= 0, own_c, m)

    def beats(rows, cols, dim):
        f = exact[rows, cols]
        if dim == 1:
            return ((f > pos_r[rows]) | ((f == pos_r[rows]) & (cols < own_r[rows]))).long()
        return ((f > pos_c[cols]) | ((f == pos_c[cols]) & (rows < own_c[cols]))).long()
    return beats


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("step", [True, False])
@pytest.mark.parametrize("capacity", ["roomy", "one chunk"])
def test_scan_tile_counts_like_brute_force(dtype, step, capacity, monkeypatch):
    """`ranking_native.scan_tile` against an entry-by-entry count of the exact scores: per row and per
    column, the entries beating its positive (exact ties to the smaller index, the positive itself
    never), the band entries of each direction (positives' own excluded) and those scored exactly:
    all of them without the fp32 step, fewer with it on a bf16 tile. 16 columns per pass, so 70 columns make
    ragged passes; with "one chunk" the scan stops for exact scores after every pass and goes on."""
    monkeypatch.setattr(ranking_native, "SCAN_COLUMNS", 16)
    if capacity == "one chunk":
        monkeypatch.setattr(ranking_native, "SCAN_CAPACITY", 16)
    p = scan_problem(dtype)
    calls = []
    beats = scan_beats(p)

    def counted_beats(rows, cols, dim):
        calls.append(rows.numel())
        return beats(rows, cols, dim)

    coef = ranking_torch._fp32_error(1.0, 1.0, 40) if step else None
    got = ranking_native.scan_tile(ranking_native.native_kernels(), p["s"], *p["bands"], *p["own"], *p["rows"],
                                   *p["pos"], *p["norms"], coef, float("inf"), counted_beats)
    m, n = p["exact"].shape
    rows, cols = torch.arange(m).repeat_interleave(n), torch.arange(n).repeat(m)
    (own_r, own_c), (lo_r, hi_r, lo_c, hi_c), s = p["own"], p["bands"], p["s"].float()
    (pos_r, pos_c), lines = p["pos"], "a line without a positive (pos −inf) counts nothing"
    want_r = beats(rows, cols, 1).view(m, n) * (cols.view(m, n) != own_r[:, None]) * (pos_r[:, None] > -torch.inf)
    want_c = beats(rows, cols, 0).view(m, n) * (rows.view(m, n) != own_c[None, :]) * (pos_c[None, :] > -torch.inf)
    assert got.above_r[36] == 0 and got.above_c[69] == 0, lines
    assert torch.equal(got.above_r, want_r.sum(1)) and torch.equal(got.above_c, want_c.sum(0))
    band_r = ((s >= lo_r[:, None]) & (s <= hi_r[:, None]) & (cols.view(m, n) != own_r[:, None])).sum()
    band_c = ((s >= lo_c[None]) & (s <= hi_c[None]) & (rows.view(m, n) != own_c[None])).sum()
    assert (got.band_r, got.band_c) == (int(band_r), int(band_c)) and got.band_r > 0 and got.band_c > 0
    resolved = got.resolved_r + got.resolved_c
    assert resolved >= 2 and sum(calls) == resolved  # the exact tie is scored exactly either way
    if not step:
        assert resolved == got.band_r + got.band_c
    elif dtype == torch.bfloat16:  # the fp32 step decides most of a bf16 band (of an fp32 band, nothing)
        assert resolved < got.band_r + got.band_c
    if capacity == "one chunk":
        assert len(calls) > 2  # it stopped for its pairs at least once before the end


def test_scan_tile_gives_up_past_max_band():
    """A tile one of whose directions holds more band entries than max_band is not counted (None),
    and its pairs are never scored exactly."""
    p = scan_problem(torch.bfloat16)

    def no_beats(rows, cols, dim):
        raise AssertionError("scored a tile that was given up")

    args = (ranking_native.native_kernels(), p["s"], *p["bands"], *p["own"], *p["rows"], *p["pos"], *p["norms"],
            ranking_torch._fp32_error(1.0, 1.0, 40))
    assert ranking_native.scan_tile(*args, 0.0, no_beats) is None
    assert ranking_native.scan_tile(*args, float("inf"), scan_beats(p)) is not None


def test_scan_tile_rejects_a_tile_it_cannot_read():
    """A tile of another dtype, a tile with strided rows, a band of another dtype or length, or a row
    index past the features: a ValueError that names what was expected, before any C code reads
    memory."""
    p = scan_problem(torch.float32)
    fn = ranking_native.native_kernels()
    rest = (*p["own"], *p["rows"], *p["pos"], *p["norms"], None, float("inf"), scan_beats(p))
    for tile, bands in ((p["s"].double(), p["bands"]), (p["s"].T.contiguous().T, p["bands"]),
                        (p["s"], (p["bands"][0].double(), *p["bands"][1:]))):
        with pytest.raises(ValueError, match="expected"):
            ranking_native.scan_tile(fn, tile, *bands, *rest)
    with pytest.raises(ValueError, match="of 37 elements"):  # a band of another length
        ranking_native.scan_tile(fn, p["s"], p["bands"][0][:30], *p["bands"][1:], *rest)
    with pytest.raises(ValueError, match="exact_scores: expected row indices"):
        ranking_native.exact_scores(fn, *p["rows"], torch.tensor([0, 37]), torch.tensor([0, 1]))
