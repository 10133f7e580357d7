"""Triton kernels of the CLIP and Mod-X losses, Liger-Kernel style: the kernels, their plain
launchers and one torch.autograd.Function, `RowLossFunction` (docs/definitions.md, "CLIP loss",
"Mod-X loss"; the direction quantities and the conventions are in losses.py).

One launch handles one *direction*: local rows X (b×d) against columns Y (B×d), the positive of
row i at column row_offset + i (image→text: X = image, Y = text; text→image: X = text, Y = image).
Per row, one pass over column tiles of S = X Yᵀ (and S' = X' Y'ᵀ for the KL) keeps online
statistics, never a B×B buffer:

  ce_i  = LSE_j(s·S_ij) − s·S_ii
  kl_i  = mask_i · (Σ_j P'_ij (x'_ij − x_ij) + LSE(x_i) − LSE(x'_i)),  x = S/τ, x' = S'/τ
  mask_i = [first argmax_j S'_ij == i]

with the cross term Σ_j P'_ij (x'_ij − x_ij) accumulated online (rescaled with the running max of
x'). `off_diagonal_only` drops j = i from both softmaxes. The CLIP loss alone is the same launch
with the KL terms switched off. Backward recomputes the tiles:
dS = g_ce·s·(P_ce − onehot) + g_kl·mask·(P − P')/τ; one kernel accumulates dX = dS·Y per row block
(and Σ (P_ce − onehot)·S for the logit-scale gradient), another dY = dSᵀ·X per column block.
Inputs fp32/bf16/fp16 (float64 is refused: use backend="torch"); products and accumulation in
fp32 (fp32 dots in IEEE precision, no TF32).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import check_features, configs, dot_tile
from .losses import ModxOptions, RowLosses, kl_switches

NEG_BIG = tl.constexpr(-1.0e30)  # running-max start: finite, so a fully masked tile never gives inf − inf

_FWD_CONFIGS = configs(
    {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32},
    [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
     for bm, bn, bk, w, st in ((64, 64, 32, 4, 3), (128, 64, 32, 8, 3), (64, 128, 32, 4, 3),
                               (128, 128, 32, 8, 2), (64, 64, 64, 4, 2))])
_BWD_CONFIGS = configs(
    {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "BLOCK_D": 32},
    [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 32, "BLOCK_D": bd}, num_warps=w, num_stages=2)
     for bm, bn, bd, w in ((64, 64, 128, 4), (64, 64, 256, 8), (32, 64, 256, 4),
                           (64, 32, 128, 4), (128, 64, 128, 8))])


@triton.autotune(configs=_FWD_CONFIGS, key=["B", "D", "HAS_CE", "HAS_KL"])
@triton.jit
def _row_loss_fwd(X, Y, XO, YO, SCALE, STATS, b, B, D, stride_x, stride_y, stride_xo, stride_yo,
                  row_offset, inv_tau,
                  HAS_CE: tl.constexpr, HAS_KL: tl.constexpr, OFF_DIAG: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """STATS (6×b, fp32): ce, lse_ce, kl (masked), lse(x), lse(x'), mask."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < b
    diag = rows + row_offset
    s = tl.load(SCALE).to(tl.float32)
    m_ce = tl.full([BLOCK_M], NEG_BIG, tl.float32)
    z_ce = tl.zeros([BLOCK_M], dtype=tl.float32)
    dg = tl.zeros([BLOCK_M], dtype=tl.float32)
    m = tl.full([BLOCK_M], NEG_BIG, tl.float32)
    z = tl.zeros([BLOCK_M], dtype=tl.float32)
    mo = tl.full([BLOCK_M], NEG_BIG, tl.float32)
    zo = tl.zeros([BLOCK_M], dtype=tl.float32)
    cr = tl.zeros([BLOCK_M], dtype=tl.float32)
    am_v = tl.full([BLOCK_M], float("-inf"), tl.float32)
    am_i = tl.zeros([BLOCK_M], dtype=tl.int32)
    for n0 in range(0, B, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        cmask = cols < B
        acc = dot_tile(X, Y, rows, cols, rmask, cmask, D, stride_x, stride_y, BLOCK_M, BLOCK_N, BLOCK_K,
                       IEEE=True)
        is_diag = cols[None, :] == diag[:, None]
        if HAS_CE:
            lg = tl.where(cmask[None, :], acc * s, float("-inf"))
            new = tl.maximum(m_ce, tl.max(lg, 1))
            z_ce = z_ce * tl.exp(m_ce - new) + tl.sum(tl.exp(lg - new[:, None]), 1)
            m_ce = new
            dg += tl.sum(tl.where(is_diag, acc, 0.0), 1)
        if HAS_KL:
            acco = dot_tile(XO, YO, rows, cols, rmask, cmask, D, stride_xo, stride_yo, BLOCK_M, BLOCK_N,
                            BLOCK_K, IEEE=True)
            sov = tl.where(cmask[None, :], acco, float("-inf"))
            tmax = tl.max(sov, 1)
            tidx = tl.min(tl.where(sov == tmax[:, None], cols[None, :], 2147483647), 1)
            better = tmax > am_v
            am_i = tl.where(better, tidx, am_i)
            am_v = tl.where(better, tmax, am_v)
            keep = cmask[None, :] & (rows[:, None] >= 0)
            if OFF_DIAG:
                keep = keep & (cols[None, :] != diag[:, None])
            x = tl.where(keep, acc * inv_tau, float("-inf"))
            xo = tl.where(keep, acco * inv_tau, float("-inf"))
            new = tl.maximum(m, tl.max(x, 1))
            z = z * tl.exp(m - new) + tl.sum(tl.exp(x - new[:, None]), 1)
            m = new
            newo = tl.maximum(mo, tl.max(xo, 1))
            rescale = tl.exp(mo - newo)  # the old running sums were relative to the previous max
            eo = tl.exp(xo - newo[:, None])
            diff = tl.where(keep, (acco - acc) * inv_tau, 0.0)
            zo = zo * rescale + tl.sum(eo, 1)
            cr = cr * rescale + tl.sum(eo * diff, 1)
            mo = newo
    if HAS_CE:
        lse_ce = m_ce + tl.log(z_ce)
        tl.store(STATS + rows, lse_ce - s * dg, mask=rmask)
        tl.store(STATS + b + rows, lse_ce, mask=rmask)
    if HAS_KL:
        lse = m + tl.log(z)
        lse_o = mo + tl.log(zo)
        kept = am_i == diag
        kl = tl.where(kept, cr / zo + ((m - mo) + tl.log(z / zo)), 0.0)  # well-conditioned LSE difference
        tl.store(STATS + 2 * b + rows, kl, mask=rmask)
        tl.store(STATS + 3 * b + rows, lse, mask=rmask)
        tl.store(STATS + 4 * b + rows, lse_o, mask=rmask)
        tl.store(STATS + 5 * b + rows, kept.to(tl.float32), mask=rmask)


@triton.jit
def _row_stats(STATS, WKL, rows, rmask, b):
    """The forward's per-row statistics backward needs: LSE of s·S, of S/τ, of S'/τ, and the KL weight."""
    lse_ce = tl.load(STATS + b + rows, mask=rmask, other=0.0)
    lse = tl.load(STATS + 3 * b + rows, mask=rmask, other=0.0)
    lse_o = tl.load(STATS + 4 * b + rows, mask=rmask, other=0.0)
    wkl = tl.load(WKL + rows, mask=rmask, other=0.0)
    return lse_ce, lse, lse_o, wkl


@triton.jit
def _ds_tile(X, Y, XO, YO, rows, cols, rmask, cmask, D, stride_x, stride_y, stride_xo, stride_yo, diag, s,
             gce, lse_ce, lse, lse_o, wkl, inv_tau, HAS_CE: tl.constexpr, HAS_KL: tl.constexpr,
             OFF_DIAG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """dLoss/dS for one tile, recomputed from the features, and Σ_j (P_ce − onehot)_ij·S_ij per row
    (logit-scale gradient)."""
    acc = dot_tile(X, Y, rows, cols, rmask, cmask, D, stride_x, stride_y, BLOCK_M, BLOCK_N, BLOCK_K, IEEE=True)
    acco = acc
    if HAS_KL:
        acco = dot_tile(XO, YO, rows, cols, rmask, cmask, D, stride_xo, stride_yo, BLOCK_M, BLOCK_N, BLOCK_K,
                        IEEE=True)
    valid = rmask[:, None] & cmask[None, :]
    is_diag = cols[None, :] == diag[:, None]
    g = tl.zeros(acc.shape, dtype=tl.float32)
    dsr = tl.zeros([acc.shape[0]], dtype=tl.float32)
    if HAS_CE:
        p = tl.where(valid, tl.exp(acc * s - lse_ce[:, None]), 0.0)
        gc = p - tl.where(is_diag & valid, 1.0, 0.0)
        dsr = tl.sum(gc * acc, 1)
        g = gc * (gce * s)
    if HAS_KL:
        keep = valid
        if OFF_DIAG:
            keep = keep & (cols[None, :] != diag[:, None])
        p = tl.where(keep, tl.exp(acc * inv_tau - lse[:, None]), 0.0)
        po = tl.where(keep, tl.exp(acco * inv_tau - lse_o[:, None]), 0.0)
        g += (p - po) * wkl[:, None]
    return g, dsr


@triton.autotune(configs=_BWD_CONFIGS, key=["B", "D", "HAS_CE", "HAS_KL"])
@triton.jit
def _row_loss_bwd_dx(X, Y, XO, YO, SCALE, GCE, STATS, WKL, DX, DSROW, b, B, D, stride_x, stride_y,
                     stride_xo, stride_yo, row_offset, inv_tau,
                     HAS_CE: tl.constexpr, HAS_KL: tl.constexpr, OFF_DIAG: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    """DX[rows, dchunk] = Σ_col-tiles dS·Y[:, dchunk]; DSROW[rows] (written by d-chunk 0)."""
    pid = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < b
    diag = rows + row_offset
    ds_ = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = ds_ < D
    s = tl.load(SCALE).to(tl.float32)
    gce = tl.load(GCE)
    lse_ce, lse, lse_o, wkl = _row_stats(STATS, WKL, rows, rmask, b)
    dx = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dsr = tl.zeros([BLOCK_M], dtype=tl.float32)
    for n0 in range(0, B, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        cmask = cols < B
        g, dsr_t = _ds_tile(X, Y, XO, YO, rows, cols, rmask, cmask, D, stride_x, stride_y, stride_xo, stride_yo,
                            diag, s, gce, lse_ce, lse, lse_o, wkl, inv_tau, HAS_CE, HAS_KL, OFF_DIAG,
                            BLOCK_M, BLOCK_N, BLOCK_K)
        dsr += dsr_t
        yt = tl.load(Y + cols[:, None] * stride_y + ds_[None, :], mask=cmask[:, None] & dmask[None, :],
                     other=0.0).to(tl.float32)
        dx = tl.dot(g, yt, dx, input_precision="ieee")
    tl.store(DX + rows[:, None] * D + ds_[None, :], dx, mask=rmask[:, None] & dmask[None, :])
    if pid_d == 0:
        tl.store(DSROW + rows, dsr, mask=rmask)


@triton.autotune(configs=_BWD_CONFIGS, key=["B", "D", "HAS_CE", "HAS_KL"])
@triton.jit
def _row_loss_bwd_dy(X, Y, XO, YO, SCALE, GCE, STATS, WKL, DY, b, B, D, stride_x, stride_y,
                     stride_xo, stride_yo, row_offset, inv_tau,
                     HAS_CE: tl.constexpr, HAS_KL: tl.constexpr, OFF_DIAG: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    """DY[cols, dchunk] = Σ_row-tiles dSᵀ·X[:, dchunk]."""
    pid = tl.program_id(0)
    pid_d = tl.program_id(1)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < B
    ds_ = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = ds_ < D
    s = tl.load(SCALE).to(tl.float32)
    gce = tl.load(GCE)
    dy = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for m0 in range(0, b, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        rmask = rows < b
        diag = rows + row_offset
        lse_ce, lse, lse_o, wkl = _row_stats(STATS, WKL, rows, rmask, b)
        g, _unused = _ds_tile(X, Y, XO, YO, rows, cols, rmask, cmask, D, stride_x, stride_y, stride_xo,
                              stride_yo, diag, s, gce, lse_ce, lse, lse_o, wkl, inv_tau, HAS_CE, HAS_KL,
                              OFF_DIAG, BLOCK_M, BLOCK_N, BLOCK_K)
        xt = tl.load(X + rows[:, None] * stride_x + ds_[None, :], mask=rmask[:, None] & dmask[None, :],
                     other=0.0).to(tl.float32)
        dy = tl.dot(tl.trans(g), xt, dy, input_precision="ieee")
    tl.store(DY + cols[:, None] * D + ds_[None, :], dy, mask=cmask[:, None] & dmask[None, :])


# ---------------------------------------------------------------------------------------------
# launchers


def _prep(x, y):
    """x and y contiguous, y in x's dtype (the kernels load both with one element type)."""
    x = x.contiguous()
    y = y.to(x.dtype).contiguous()
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature dimensions differ: {x.shape[1]} and {y.shape[1]}")
    return x, y


def row_loss_forward(x, y, xo, yo, scale, row_offset, inv_tau, off_diag, want_ce, want_kl):
    """Launch the forward kernel; returns STATS (6×b fp32)."""
    b, D = x.shape
    B = y.shape[0]
    stats = torch.zeros(6, b, device=x.device, dtype=torch.float32)
    if b == 0:
        return stats
    grid = lambda meta: (triton.cdiv(b, meta["BLOCK_M"]),)
    _row_loss_fwd[grid](x, y, xo, yo, scale, stats, b, B, D, x.stride(0), y.stride(0), xo.stride(0),
                        yo.stride(0), row_offset, inv_tau, HAS_CE=want_ce, HAS_KL=want_kl,
                        OFF_DIAG=off_diag)
    return stats


def row_loss_backward(x, y, xo, yo, scale, stats, gce, wkl, row_offset, inv_tau, off_diag, want_ce,
                      want_kl, need_x, need_y, need_s):
    """Launch the backward kernels; returns (dX fp32 | None, dY fp32 | None, Σ ds | None)."""
    b, D = x.shape
    B = y.shape[0]
    dx = dsrow = dy = None
    common = dict(HAS_CE=want_ce, HAS_KL=want_kl, OFF_DIAG=off_diag)
    if need_x or need_s:
        dx = torch.empty(b, D, device=x.device, dtype=torch.float32)
        dsrow = torch.zeros(b, device=x.device, dtype=torch.float32)
        grid = lambda meta: (triton.cdiv(b, meta["BLOCK_M"]), triton.cdiv(D, meta["BLOCK_D"]))
        _row_loss_bwd_dx[grid](x, y, xo, yo, scale, gce, stats, wkl, dx, dsrow, b, B, D, x.stride(0),
                               y.stride(0), xo.stride(0), yo.stride(0), row_offset, inv_tau, **common)
    if need_y:
        dy = torch.empty(B, D, device=x.device, dtype=torch.float32)
        grid = lambda meta: (triton.cdiv(B, meta["BLOCK_N"]), triton.cdiv(D, meta["BLOCK_D"]))
        _row_loss_bwd_dy[grid](x, y, xo, yo, scale, gce, stats, wkl, dy, b, B, D, x.stride(0),
                               y.stride(0), xo.stride(0), yo.stride(0), row_offset, inv_tau, **common)
    return dx, dy, (dsrow.sum() if need_s else None)


class RowLossFunction(torch.autograd.Function):
    """(Σ ce_i, Σ kl_i, kept) of one direction: the CLIP cross-entropy (want_ce) and Mod-X's masked
    KL (want_kl), from the same tiles."""

    @staticmethod
    def forward(ctx, x, y, xo, yo, scale, row_offset, inv_tau, off_diag, want_ce, want_kl):
        x, y = _prep(x, y)
        if want_kl:
            xo, yo = _prep(xo, yo)
        else:
            xo, yo = x, y
        scale_f = scale.detach().reshape(-1)[:1].float().contiguous()
        stats = row_loss_forward(x, y, xo, yo, scale_f, row_offset, inv_tau, off_diag, want_ce, want_kl)
        ctx.save_for_backward(x, y, xo, yo, scale, scale_f, stats)
        ctx.cfg = (row_offset, inv_tau, off_diag, want_ce, want_kl)
        kept = (stats[5] > 0).sum()
        ctx.mark_non_differentiable(kept)
        return stats[0].sum(), stats[2].sum(), kept

    @staticmethod
    def backward(ctx, g_ce, g_kl, _g_kept):
        x, y, xo, yo, scale, scale_f, stats = ctx.saved_tensors
        row_offset, inv_tau, off_diag, want_ce, want_kl = ctx.cfg
        dev = x.device
        gce = (g_ce.detach().float().reshape(1) if (want_ce and g_ce is not None)
               else torch.zeros(1, device=dev)).contiguous()
        gkl = g_kl.detach().float() if (want_kl and g_kl is not None) else torch.zeros((), device=dev)
        wkl = (stats[5] * gkl * inv_tau).contiguous()
        need_x, need_y = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_s = want_ce and ctx.needs_input_grad[4]
        dx, dy, dsum = row_loss_backward(x, y, xo, yo, scale_f, stats, gce, wkl, row_offset, inv_tau,
                                         off_diag, want_ce, want_kl, need_x, need_y, need_s)
        gx = dx.to(x.dtype) if need_x else None
        gy = dy.to(y.dtype) if need_y else None
        gs = (dsum * gce[0]).to(scale.dtype).reshape(scale.shape) if need_s else None
        return gx, gy, None, None, gs, None, None, None, None, None


def direction(x, y, xo, yo, scale, row_offset, options: ModxOptions | None, want_ce: bool):
    """(Σ ce_i, Σ kl_i, kept) of one direction with the Triton kernels."""
    want_kl, inv_tau, off_diag = kl_switches(options)
    check_features(*((x, y, xo, yo) if want_kl else (x, y)))
    return RowLossFunction.apply(x, y, xo, yo, scale, int(row_offset), inv_tau, off_diag, bool(want_ce), want_kl)


LOSSES = RowLosses(direction)
