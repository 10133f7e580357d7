"""The loss kernels (kernels/losses.py, losses_torch.py, losses_triton.py and the loss formulas of
reference.py): clip_loss, modx_kl, modx_loss for the triton (TRITON_INTERPRET=1 on the CPU), torch
and reference backends, against a float64 ground truth, an independent dense implementation of
the Mod-X loss (docs/definitions.md, "Mod-X loss"), and open_clip's ClipLoss. Shapes are small
(the interpreter is slow) and not multiples of the block sizes."""
from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
import torch.nn.functional as F

from geomlab import kernels
from geomlab.kernels import MODX_ALPHA, REDUCTIONS, ModxOptions, losses, reference

B, D = 37, 19  # neither a multiple of the interpreter's 32-blocks nor of anything else
GRAD_W = (1.0, 3.0, 5.0)  # weights of clip, kl_i2t, kl_t2i in the backpropagated scalar


def make(b=B, d=D, seed=0, noise=1.0, case="mixed"):
    """float64 L2-normalised (I, T, I', T'); case: mixed | none_masked | all_masked | ties."""
    g = torch.Generator().manual_seed(seed)
    r = lambda: torch.randn(b, d, generator=g, dtype=torch.float64)
    z = r()
    image, text = F.normalize(z + 0.6 * r(), dim=1), F.normalize(z + 0.6 * r(), dim=1)
    image_old, text_old = F.normalize(z + noise * r(), dim=1), F.normalize(z + noise * r(), dim=1)
    if case == "none_masked":  # S'_ii = 1 is the unique row and column maximum
        image_old, text_old = image.clone(), image.clone()
    elif case == "all_masked":  # S'_ii = −1 is the minimum
        text_old = -image_old
    elif case == "ties":  # duplicate old rows: the first index wins
        image_old[5], text_old[5] = image_old[3], text_old[3]
        image_old[9], text_old[9] = image_old[8], text_old[8]
    return image, text, image_old, text_old


def first_argmax_kept(image_old, text_old):
    """(kept_i2t, kept_t2i) counted row by row: rows (columns) of S' = I' T'ᵀ whose first maximum
    is on the diagonal."""
    s = (image_old.double() @ text_old.double().T).tolist()
    n = len(s)
    rows = sum(max(range(n), key=lambda j: (s[i][j], -j)) == i for i in range(n))
    cols = sum(max(range(n), key=lambda i: (s[i][j], -i)) == j for j in range(n))
    return rows, cols


def run(backend, feats, dtype, scale=7.0, **opts):
    """Forward + backward of clip + 3·kl_i2t + 5·kl_t2i: (values..., grads...) as float64."""
    image, text, image_old, text_old = (t.to(dtype) for t in feats)
    image.requires_grad_(True)
    text.requires_grad_(True)
    s = torch.tensor(scale, dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                     requires_grad=True)
    total, p = kernels.modx_loss(image, text, image_old, text_old, s, backend=backend, **opts)
    obj = GRAD_W[0] * p["clip"] + GRAD_W[1] * p["kl_i2t"] + GRAD_W[2] * p["kl_t2i"]
    obj.backward()
    vals = [total, p["clip"], p["kl_i2t"], p["kl_t2i"]]
    want_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # half precision: fp32 results
    assert all(v.dtype == want_dtype for v in vals), [v.dtype for v in vals]
    assert image.grad.dtype == text.grad.dtype == dtype
    out = [v.detach().double() for v in vals] + [image.grad.double(), text.grad.double(), s.grad.double()]
    return out, (int(p["kept_i2t"]), int(p["kept_t2i"]))


def rel_err(a, truth):
    return float((a - truth).abs().max() / (truth.abs().max() + 1e-12))


NAMES = ("total", "clip", "kl_i2t", "kl_t2i", "d_image", "d_text", "d_logit_scale")


def check_against_fp64(backend, feats, dtype, **opts):
    """Error of `backend` at `dtype` against fp64 on the same (rounded) inputs must be no worse
    than the dense fp32-accumulating formula's own error at that dtype, plus a small margin."""
    rounded = tuple(t.to(dtype).double() for t in feats)
    truth, kept_truth = run("reference", rounded, torch.float64, **opts)
    dense, _ = run("reference", feats, dtype, **opts)
    got, kept = run(backend, feats, dtype, **opts)
    n = feats[0].shape[0]
    assert kept == kept_truth == ((n, n) if opts.get("selection") == "all" else first_argmax_kept(*rounded[2:]))
    for name, g, d, t in zip(NAMES, got, dense, truth):
        e, e_dense = rel_err(g, t), rel_err(d, t)
        assert e <= 2.0 * e_dense + 2e-6, f"{backend} {dtype} {name}: rel err {e:.3g} vs dense {e_dense:.3g}"
    return kept


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    # several row tiles for the torch backend too (R = 16 rows per tile)
    monkeypatch.setattr(losses, "TILE_ELEMS", 16 * B)
    return request.param


# --- the backends against the fp64 ground truth ---------------------------------------------------

OPTION_SETS = [
    dict(),
    dict(temperature=0.5, reduction="mean"),
    dict(temperature=2.0, reduction="kept_mean", off_diagonal_only=True),
]


@pytest.mark.parametrize("opts", OPTION_SETS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_backend_fp32(backend, opts):
    kept = check_against_fp64(backend, make(), torch.float32, **opts)
    assert 0 < kept[0] < B and 0 < kept[1] < B  # a mixed mask


def test_backend_bf16_offdiag_ties(backend):
    check_against_fp64(backend, make(case="ties"), torch.bfloat16, temperature=0.7,
                       off_diagonal_only=True, reduction="sum")


@pytest.mark.parametrize("case", ["none_masked", "all_masked", "ties"])
def test_backend_mask_cases(backend, case):
    kept = check_against_fp64(backend, make(case=case), torch.float32, reduction="kept_mean")
    if case == "none_masked":
        assert kept == (B, B)
    elif case == "all_masked":
        assert kept == (0, 0)
    else:  # rows 5 and 9 copy rows 3 and 8: their first maximum is at the copied index, not theirs
        kept_truth = first_argmax_kept(*make(case=case)[2:])
        assert kept == kept_truth and kept_truth[0] < B and kept_truth[1] < B


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backend_selection_all(backend, dtype):
    """Every row kept (LwF's and ZSCL's distillation), on features whose "correct" mask drops rows."""
    feats = make(seed=7)
    assert first_argmax_kept(*feats[2:])[0] < B
    kept = check_against_fp64(backend, feats, dtype, temperature=0.25, reduction="mean", selection="all")
    assert kept == (B, B)


def test_backend_fp16_and_modx_kl_alone(backend):
    feats = make(b=21, d=33, seed=3)
    check_against_fp64(backend, feats, torch.float16, reduction="mean")
    # modx_kl on its own (no cross-entropy in the kernel)
    image, text, image_old, text_old = (t.float() for t in feats)
    got, ref = [], []
    for bk, out in ((backend, got), ("reference", ref)):
        i, t = image.clone().requires_grad_(), text.clone().requires_grad_()
        kl = kernels.modx_kl(i, t, image_old, text_old, temperature=0.8, reduction="sum", backend=bk)
        kl.backward()
        out += [kl.detach(), i.grad, t.grad]
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# --- independent dense implementation of the Mod-X loss (per-row loops, F.kl_div) ------------------


def spec_modx(image, text, image_old, text_old, s, *, alpha, temperature=1.0, reduction="sum",
              off_diagonal_only=False, selection="correct"):
    n = image.shape[0]
    S, So = image @ text.T, image_old @ text_old.T
    ce_rows = [-(F.log_softmax(s * S[i], 0)[i]) for i in range(n)]
    ce_cols = [-(F.log_softmax(s * S[:, j], 0)[j]) for j in range(n)]
    clip = 0.5 * (torch.stack(ce_rows).mean() + torch.stack(ce_cols).mean())

    def direction(M, Mo):
        total, kept = M.new_zeros(()), 0
        for i in range(n):
            first_max = int(torch.nonzero(Mo[i] == Mo[i].max())[0])
            if selection == "correct" and first_max != i:
                continue
            kept += 1
            cols = [j for j in range(n) if not (off_diagonal_only and j == i)]
            logp = F.log_softmax(M[i, cols] / temperature, 0)
            logq = F.log_softmax(Mo[i, cols] / temperature, 0)
            total = total + F.kl_div(logp, logq, reduction="sum", log_target=True)
        div = {"sum": 1, "mean": n, "kept_mean": max(kept, 1)}[reduction]
        return total / div, kept

    kl_i, k_i = direction(S, So)
    kl_t, k_t = direction(S.T, So.T)
    return clip + alpha * 0.5 * (kl_i + kl_t), clip, kl_i, kl_t, k_i, k_t


F64_BACKENDS = ["reference", "torch"]  # triton refuses float64: test_triton_refuses_float64
F64_TOL = dict(rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bk", F64_BACKENDS)
@pytest.mark.parametrize("opts", [dict(), dict(temperature=0.3, reduction="mean"),
                                  dict(temperature=1.5, reduction="kept_mean", off_diagonal_only=True),
                                  dict(temperature=0.4, reduction="mean", selection="all"),
                                  dict(temperature=1.5, reduction="kept_mean", off_diagonal_only=True, selection="all")])
def test_float64_against_independent_formula(bk, opts):
    """float64 in, float64 out, computed in float64: modx_loss with its parts, modx_kl and clip_loss
    and their gradients within 1e-12 of the per-row formula."""
    image, text, image_old, text_old = make(b=12, d=9, seed=5, case="ties", noise=0.9)
    res = {}
    for name in ("spec", bk):
        i, t = image.clone().requires_grad_(), text.clone().requires_grad_()
        s = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
        if name == "spec":
            total, clip, kl_i, kl_t, k_i, k_t = spec_modx(i, t, image_old, text_old, s, alpha=3.0, **opts)
            clip_alone, kl = clip, 0.5 * (kl_i + kl_t)
        else:
            total, p = kernels.modx_loss(i, t, image_old, text_old, s, alpha=3.0, backend=bk, **opts)
            clip, kl_i, kl_t, k_i, k_t = p["clip"], p["kl_i2t"], p["kl_t2i"], int(p["kept_i2t"]), int(p["kept_t2i"])
            clip_alone = kernels.clip_loss(i, t, s, backend=bk)
            kl = kernels.modx_kl(i, t, image_old, text_old, backend=bk, **opts)
        values = [total, clip, clip_alone, kl_i, kl_t, kl]
        (total + clip_alone + kl_t + kl).backward()
        res[name] = (values + [i.grad, t.grad, s.grad], (k_i, k_t))
    (want, kept_want), (got, kept_got) = res["spec"], res[bk]
    assert kept_got == kept_want and 0 < kept_want[0] <= 12
    assert (kept_want == (12, 12)) == (opts.get("selection") == "all")  # "all" keeps the rows "correct" drops
    for a, b in zip(got, want):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b.detach(), **F64_TOL)


@pytest.mark.parametrize("bk", F64_BACKENDS)
@pytest.mark.parametrize("data_parallel", [False, True])
@pytest.mark.parametrize("opts", [dict(), dict(temperature=0.7, reduction="kept_mean", off_diagonal_only=True),
                                  dict(temperature=0.7, reduction="kept_mean", selection="all")])
def test_float64_gradcheck(bk, data_parallel, opts):
    """Every loss and part against finite differences, full batch and split over two ranks."""
    image, text, image_old, text_old = make(b=8, d=5, seed=0, noise=0.9)
    assert first_argmax_kept(image_old, text_old) == (3, 5)  # a mixed mask in both directions
    splits = ((0, 3), (3, 8)) if data_parallel else ((0, 8),)

    def all_losses(i, t, s):
        out = []
        for lo, hi in splits:
            cols = dict(image_all=i, text_all=t, row_offset=lo) if data_parallel else {}
            old_cols = dict(image_old_all=image_old, text_old_all=text_old) if data_parallel else {}
            rows = (i[lo:hi], t[lo:hi], image_old[lo:hi], text_old[lo:hi])
            total, p = kernels.modx_loss(*rows, s, alpha=3.0, backend=bk, **opts, **cols, **old_cols)
            kl = kernels.modx_kl(*rows, backend=bk, **opts, **cols, **old_cols)
            clip = kernels.clip_loss(i[lo:hi], t[lo:hi], s, backend=bk, **cols)
            out += [total, p["clip"], p["kl_i2t"], p["kl_t2i"], kl, clip]
        return tuple(out)

    leaves = (image.clone().requires_grad_(), text.clone().requires_grad_(),
              torch.tensor(3.0, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(all_losses, leaves)


def test_triton_refuses_float64():
    image, text, image_old, text_old = make(b=8, d=4)  # float64
    s = torch.tensor(2.0, dtype=torch.float64)
    for call in (lambda: kernels.clip_loss(image, text, s, backend="triton"),
                 lambda: kernels.modx_kl(image, text, image_old, text_old, backend="triton"),
                 lambda: kernels.modx_loss(image, text, image_old, text_old, s, backend="triton")):
        with pytest.raises(TypeError, match=r"torch\.float64.*backend='torch'"):
            call()


# --- clip_loss against open_clip's ClipLoss ----------------------------------------------------------


@pytest.mark.parametrize("bk,dtype", [(bk, torch.float32) for bk in ("reference", "torch", "triton")]
                         + [(bk, torch.float64) for bk in F64_BACKENDS])
def test_clip_loss_matches_open_clip(bk, dtype, monkeypatch):
    open_clip = pytest.importorskip("open_clip")
    monkeypatch.setattr(losses, "TILE_ELEMS", 16 * B)
    image, text, _, _ = (t.to(dtype) for t in make(seed=7))
    # the model's parameter; exp() is passed, as open_clip does
    param = torch.tensor(2.3, dtype=dtype, requires_grad=True)
    res = []
    for fn in (lambda i, t, s: open_clip.loss.ClipLoss()(i, t, s),
               lambda i, t, s: kernels.clip_loss(i, t, s, backend=bk)):
        i, t = image.clone().requires_grad_(), text.clone().requires_grad_()
        param.grad = None
        loss = fn(i, t, param.exp())
        loss.backward()
        res.append([loss.detach(), i.grad, t.grad, param.grad.clone()])
    tol = F64_TOL if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    for a, b in zip(res[1], res[0]):
        assert a.dtype == dtype
        torch.testing.assert_close(a, b, **tol)


# --- data parallel: local rows against gathered columns ----------------------------------------------


@pytest.mark.parametrize("bk", ["reference", "torch", "triton"])
@pytest.mark.parametrize("selection", ["correct", "all"])
def test_data_parallel_sums_to_full_batch(bk, selection, monkeypatch):
    monkeypatch.setattr(losses, "TILE_ELEMS", 16 * B)
    image, text, image_old, text_old = (t.float() for t in make(seed=11, case="ties"))
    opts = dict(alpha=3.0, temperature=0.7, reduction="kept_mean", off_diagonal_only=True, selection=selection)

    def leaves():
        return image.clone().requires_grad_(), text.clone().requires_grad_(), torch.tensor(5.0, requires_grad=True)

    i, t, s = leaves()
    full, pf = kernels.modx_loss(i, t, image_old, text_old, s, backend=bk, **opts)
    (full + pf["clip"]).backward()
    want = [full.detach(), pf["clip"].detach(), pf["kl_i2t"].detach(), pf["kl_t2i"].detach(), i.grad, t.grad, s.grad]

    i, t, s = leaves()  # gathered tensors = the same leaves (gather_with_grad semantics)
    acc, kept = [0.0] * 4, [0, 0]
    for lo, hi in ((0, 12), (12, 13), (13, 37)):
        tot, p = kernels.modx_loss(i[lo:hi], t[lo:hi], image_old[lo:hi], text_old[lo:hi], s, backend=bk,
                                   image_all=i, text_all=t, image_old_all=image_old, text_old_all=text_old,
                                   row_offset=lo, **opts)
        (tot + p["clip"]).backward()
        for k, v in enumerate((tot, p["clip"], p["kl_i2t"], p["kl_t2i"])):
            acc[k] = acc[k] + v.detach()
        kept[0] += int(p["kept_i2t"])
        kept[1] += int(p["kept_t2i"])
    got = acc + [i.grad, t.grad, s.grad]
    assert kept == [int(pf["kept_i2t"]), int(pf["kept_t2i"])]
    assert (kept == [B, B]) == (selection == "all")  # "correct" drops rows of these features
    for name, a, b in zip(NAMES, got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    # clip_loss alone
    i, t, s = leaves()
    kernels.clip_loss(i, t, s, backend=bk).backward()
    want = [i.grad, t.grad, s.grad]
    i, t, s = leaves()
    for lo, hi in ((0, 20), (20, 37)):
        kernels.clip_loss(i[lo:hi], t[lo:hi], s, backend=bk, image_all=i, text_all=t, row_offset=lo).backward()
    for a, b in zip((i.grad, t.grad, s.grad), want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# --- memory property and API errors --------------------------------------------------------------------


def test_torch_backend_never_builds_a_BxB_tensor(monkeypatch):
    from torch.utils._python_dispatch import TorchDispatchMode

    n = 96
    monkeypatch.setattr(losses, "TILE_ELEMS", 16 * n)  # tiles of 16 × 96

    class Largest(TorchDispatchMode):
        biggest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for o in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(o, torch.Tensor):
                    Largest.biggest = max(Largest.biggest, o.numel())
            return out

    image, text, image_old, text_old = (t.float() for t in make(b=n, d=8))
    image.requires_grad_(True)
    text.requires_grad_(True)
    s = torch.tensor(3.0, requires_grad=True)
    with Largest():
        for kw in (dict(), dict(image_all=image, text_all=text, image_old_all=image_old,
                                text_old_all=text_old, row_offset=0)):
            total, _ = kernels.modx_loss(image, text, image_old, text_old, s, backend="torch",
                                         reduction="kept_mean", **kw)
            total.backward()
    assert Largest.biggest <= 16 * n < n * n


def test_bad_arguments():
    image, text, image_old, text_old = (t.float() for t in make(b=8, d=4))
    s = torch.tensor(2.0)
    for bk in ("reference", "torch"):
        with pytest.raises(ValueError, match="reduction"):
            kernels.modx_loss(image, text, image_old, text_old, s, reduction="max", backend=bk)
        with pytest.raises(ValueError, match="temperature"):
            kernels.modx_kl(image, text, image_old, text_old, temperature=0.0, backend=bk)
        with pytest.raises(ValueError):
            kernels.clip_loss(image, text, s, backend=bk, image_all=image, text_all=text, row_offset=3)
    with pytest.raises(ValueError, match="backend"):
        kernels.clip_loss(image, text, s, backend="cuda")


def test_reference_clip_loss_is_the_mean_cross_entropy():
    image, text, _, _ = make(b=8, d=4)
    labels = torch.arange(8)
    want = 0.5 * (F.cross_entropy(2.0 * image @ text.T, labels) + F.cross_entropy(2.0 * text @ image.T, labels))
    torch.testing.assert_close(reference.clip_loss(image, text, torch.tensor(2.0)), want, **F64_TOL)


def test_modx_options_declared_once():
    """The Mod-X options and defaults live in ModxOptions / MODX_ALPHA, and the public signatures
    (unchanged: positional features, keyword-only options) take their defaults from there."""
    defaults = dataclasses.asdict(ModxOptions())
    assert defaults == {"temperature": 1.0, "reduction": "sum", "off_diagonal_only": False, "selection": "correct"}
    assert MODX_ALPHA == 20.0 and REDUCTIONS == ("sum", "mean", "kept_mean")
    assert str(inspect.signature(kernels.clip_loss)) == (
        "(image, text, logit_scale, *, backend='auto', image_all=None, text_all=None, row_offset=0)")
    dp = "image_all=None, text_all=None, image_old_all=None, text_old_all=None, row_offset=0"
    assert str(inspect.signature(kernels.modx_kl)) == (
        "(image, text, image_old, text_old, *, temperature=1.0, reduction='sum', off_diagonal_only=False, "
        f"selection='correct', backend='auto', {dp})")
    assert str(inspect.signature(kernels.modx_loss)) == (
        "(image, text, image_old, text_old, logit_scale, *, alpha=20.0, temperature=1.0, reduction='sum', "
        f"off_diagonal_only=False, selection='correct', backend='auto', {dp})")
    with pytest.raises(ValueError, match="reduction"):
        ModxOptions(reduction="max")
    with pytest.raises(ValueError, match="temperature"):
        ModxOptions(temperature=-1.0)
    with pytest.raises(ValueError, match="selection"):
        ModxOptions(selection="kept")


def test_torch_backend_under_autocast_and_auto_dispatch():
    image, text, image_old, text_old = (t.float() for t in make(b=20, d=16, seed=2))
    s = torch.tensor(6.0)
    want, _ = kernels.modx_loss(image, text, image_old, text_old, s, backend="reference")
    on_torch, _ = kernels.modx_loss(image, text, image_old, text_old, s, backend="torch")
    on_auto, _ = kernels.modx_loss(image, text, image_old, text_old, s)
    assert torch.equal(on_auto, on_torch)  # auto = torch on the CPU
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = kernels.modx_loss(image, text, image_old, text_old, s)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bk", ["reference", "torch", "triton"])
def test_single_pair_off_diagonal_is_zero_not_nan(bk):
    """One pair: the cross-entropy of a single logit and the KL of an empty off-diagonal softmax
    are 0, and so are their gradients."""
    x = F.normalize(torch.randn(1, 5, generator=torch.Generator().manual_seed(0)), dim=1)
    i, t = x.clone().requires_grad_(), x.clone().requires_grad_()
    total, p = kernels.modx_loss(i, t, x, x, torch.tensor(2.0), off_diagonal_only=True, backend=bk)
    total.backward()
    assert [float(v.detach()) for v in (total, p["clip"], p["kl_i2t"], p["kl_t2i"])] == [0.0] * 4
    assert int(p["kept_i2t"]) == int(p["kept_t2i"]) == 1
    torch.testing.assert_close(i.grad, torch.zeros_like(i), rtol=0, atol=1e-7)
    torch.testing.assert_close(t.grad, torch.zeros_like(t), rtol=0, atol=1e-7)


# --- triton backend: dtypes, devices, NaN ---------------------------------------------------------


def test_triton_mixed_dtypes_keep_each_gradient_dtype():
    """bf16 image with fp32 text: computed in fp32, each gradient in its input's dtype (the fp32
    one not rounded to bf16)."""
    image, text, image_old, text_old = make(seed=4)
    grads = {}
    for bk in ("triton", "reference"):
        i, t = image.to(torch.bfloat16).requires_grad_(), text.float().requires_grad_()
        total, _ = kernels.modx_loss(i, t, image_old.float(), text_old.to(torch.bfloat16), torch.tensor(5.0),
                                     backend=bk)
        total.backward()
        grads[bk] = (i.grad, t.grad)
    assert grads["triton"][0].dtype == torch.bfloat16 and grads["triton"][1].dtype == torch.float32
    torch.testing.assert_close(grads["triton"][1], grads["reference"][1], rtol=1e-5, atol=1e-6)


def test_triton_checks_every_tensor_device():
    image, text, _, _ = (t.float() for t in make(b=8, d=4))
    with pytest.raises(RuntimeError, match="logit_scale on meta"):
        kernels.clip_loss(image, text, torch.tensor(2.0, device="meta"), backend="triton")


def test_triton_nan_feature_gives_nan_loss():
    """A NaN feature, current or old model, makes the triton loss NaN: no max drops it (compiled
    tl.max ignores NaN), no mask hides it."""
    image, text, image_old, text_old = (t.float() for t in make(b=20, d=8, seed=6))
    for k, part in ((0, "clip"), (2, "kl_i2t")):
        poisoned = [t.clone() for t in (image, text, image_old, text_old)]
        poisoned[k][3, 1] = float("nan")
        total, parts = kernels.modx_loss(*poisoned, torch.tensor(3.0), backend="triton")
        assert torch.isnan(total) and torch.isnan(parts[part])
