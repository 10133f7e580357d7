"""Triton kernels of the CLIP and Mod-X losses, Liger-Kernel style: the kernels, their plain
launchers and one torch.autograd.Function, `LossFunction` (docs/definitions.md, "CLIP loss",
"Mod-X loss"; the direction quantities and the conventions are in losses.py).

The tiles are S = X Yᵀ (and S' = X' Y'ᵀ for the KL) over local rows X (b×d) and columns Y (B×d),
the positive of row i at column row_offset + i. Per row, online statistics over column tiles,
never a B×B buffer:

  ce_i  = LSE_j(s·S_ij) − s·S_ii
  kl_i  = mask_i · (Σ_j P'_ij (x'_ij − x_ij) + LSE(x_i) − LSE(x'_i)),  x = S/τ, x' = S'/τ
  mask_i = [first argmax_j S'_ij == i]   (selection "correct"; "all": mask_i = 1, no argmax taken)

with the cross term Σ_j P'_ij (x'_ij − x_ij) accumulated online (rescaled with the running max of
x'). `off_diagonal_only` drops j = i from both softmaxes.

Both directions from one pass (`fused`, full batch only: X = image, Y = text, b = B): text→image
is the column side of the same tiles, so each tile also updates its columns' statistics. Work is
split into (row split × column split) programs, so small batches still fill the GPU; each program
writes its rows' statistics over its columns and, in the fused pass, its columns' statistics
over its rows (a read-modify-write of the program's own slice: one slot per row split, not per
row block, keeps the buffer at a few MB at B = 65,536), and the launcher merges the split
partials (log-sum-exp merge) in torch. With data parallelism (row_offset, gathered columns) the
two directions have different row and column sets, so each is its own launch (`direction`).

Backward recomputes the tiles: dS = s·Σ_side g_ce·(P_ce − onehot) + Σ_side w·(P − P'), the
row side's terms plus, fused, the column side's. One kernel, `_loss_bwd`, accumulates dA = dT·B
over tiles T = A·Bᵀ of its own rows: launched with A = X for dX (and Σ g_ce·(P_ce − onehot)·S,
the logit-scale gradient) and with A = Y for dY (its tiles are Sᵀ, the sides' roles swapped), so
both accumulate along their MMA's rows. The accumulator spans the feature dimension up to 512 for
16-bit features (128 for fp32, whose tf32x3 operands take twice the registers), so the tiles are
computed once per launch, not once per feature chunk; when the own side has few blocks (data
parallel) the other side is split across programs and the partial gradients summed. dS enters
the gradient MMA in the features' dtype (divided by its largest coefficient first, so fp16
neither overflows nor flushes it), accumulation is fp32, and each input's gradient comes back in
that input's own dtype. Inputs fp32/bf16/fp16 (float64 is refused: use backend="torch"); fp32
tiles use tf32x3 tensor-core products (_triton.FP32_PRECISION).

NaN: the argmax of the Mod-X mask skips NaN scores (compiled tl.max ignores NaN, the interpreter
propagates it: both now agree); a NaN score reaches its row's (and column's) log-sum-exp, so the
loss is NaN, masked row or not.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._triton import (FP32_PRECISION, INTERPRET, SPLIT_ALIGN, UPCAST, check_inputs, configs, dot_tile,
                      size_class, splits, target_programs)
from .losses import ModxOptions, RowLosses, kl_switches

NEG_BIG = tl.constexpr(-1.0e30)  # running-max start: finite, so a fully masked tile never gives inf − inf
BIG_INDEX = tl.constexpr(2147483647)
# the split partials of one side's statistics: a [N_STATS, splits, n] fp32 buffer (and the
# argmax's index in a [splits, n] int32 one); DIAG (S_ii) only on the row side
M_CE, Z_CE, M_KL, Z_KL, M_OLD, Z_OLD, CROSS, AM_V, DIAG = (tl.constexpr(i) for i in range(9))
N_STATS = 9
#: feature chunk of the gradient accumulators, 16-bit and fp32 features: the tiles are recomputed
#: once per chunk, so once up to d = 512 in 16-bit (fp32's tf32x3 operands take twice the registers)
MAX_BLOCK_D = (64, 64) if INTERPRET else (512, 128)

_FWD_CONFIGS = configs(
    {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32},
    [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
     for bm, bn, bk, w, st in ((128, 32, 32, 8, 3), (64, 32, 32, 4, 3), (128, 64, 32, 8, 3))])
# the dX/dY accumulator is a BLOCK_M × BLOCK_D fp32 register tile (128 registers per thread at
# BLOCK_D = 512 over 8 warps): the score tiles beside it stay narrow
_BWD_CONFIGS = configs(
    {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32},
    [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
     for bm, bn, bk, w, st in ((64, 16, 64, 8, 2), (64, 16, 32, 8, 2), (64, 32, 16, 8, 2), (64, 32, 16, 4, 2))])


def _prune_fwd(configs, named_args, **kwargs):
    """The fused Mod-X pass keeps nine statistics per tile column (replicated across the threads
    of a column): only BLOCK_N = 32 stays clear of spills there."""
    if kwargs["BOTH"] and kwargs["HAS_KL"]:
        return [c for c in configs if c.kwargs["BLOCK_N"] <= 32]
    return configs


def _prune_bwd(configs, named_args, **kwargs):
    """fp32 tiles take BLOCK_K = 16 (tf32x3 holds each operand as two tf32 halves in registers),
    16-bit ones BLOCK_K ≥ 32."""
    fp32 = named_args["A"].element_size() == 4
    return [c for c in configs if (c.kwargs["BLOCK_K"] <= 16) == fp32] or configs[:1]


_FWD_KEY = ["b_class", "B_class", "D", "HAS_CE", "HAS_KL", "OFF_DIAG", "ARGMAX", "BOTH"]
_BWD_KEY = ["own_class", "other_class", "D", "HAS_CE", "HAS_KL", "OFF_DIAG", "OWN_STATS", "OTHER_STATS",
            "SCALE_GRAD", "BLOCK_D"]


@triton.jit
def _lse_update(m, z, x, axis: tl.constexpr):
    """Online log-sum-exp (running max m, sum z) updated with the tile x along `axis`."""
    new = tl.maximum(m, tl.max(x, axis))
    z = z * tl.exp(m - new) + tl.sum(tl.exp(x - tl.expand_dims(new, axis)), axis)
    return new, z


@triton.jit
def _cross_update(mo, zo, cr, xo, diff, axis: tl.constexpr):
    """Online Σ exp(x' − max x')·(x' − x) and LSE(x'): the old running sums were relative to the
    previous max, so they are rescaled with it."""
    new = tl.maximum(mo, tl.max(xo, axis))
    rescale = tl.exp(mo - new)
    eo = tl.exp(xo - tl.expand_dims(new, axis))
    return new, zo * rescale + tl.sum(eo, axis), cr * rescale + tl.sum(eo * diff, axis)


@triton.jit
def _argmax_update(am_v, am_i, sov, idx, axis: tl.constexpr):
    """Running first argmax; the tile's entries in increasing index order come after those seen.
    NaN entries arrive as -inf: compiled tl.max ignores NaN where the interpreter propagates it."""
    tmax = tl.max(sov, axis)
    tidx = tl.min(tl.where(sov == tl.expand_dims(tmax, axis), idx, BIG_INDEX), axis)
    better = tmax > am_v
    return tl.where(better, tmax, am_v), tl.where(better, tidx, am_i)


@triton.jit
def _load_stat(ptr, offset, mask, identity):
    """One column statistic of the program's slice (L2, not L1: other threads of the program wrote it)."""
    return tl.load(ptr + offset, mask=mask, other=identity, cache_modifier=".cg")


@triton.autotune(configs=_FWD_CONFIGS, key=_FWD_KEY, prune_configs_by={"early_config_prune": _prune_fwd})
@triton.jit
def _loss_fwd(X, Y, XO, YO, SCALE, ROWP, ROWI, COLP, COLI, b, B, D, stride_x, stride_y, stride_xo, stride_yo,
              row_offset, inv_tau, rows_per_split, cols_per_split, n_row_splits, n_col_splits, b_class, B_class,
              HAS_CE: tl.constexpr, HAS_KL: tl.constexpr, OFF_DIAG: tl.constexpr, ARGMAX: tl.constexpr,
              BOTH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (row split, column split): ROWP/ROWI[:, column split, its rows] and, with BOTH,
    COLP/COLI[:, row split, its columns] (statistics in the order M_CE .. DIAG). ARGMAX: the old
    scores' running first argmax, for the Mod-X mask (selection "correct")."""
    pid = tl.program_id(0)
    r_split = pid // n_col_splits
    c_split = pid % n_col_splits
    row_lo = r_split * rows_per_split
    row_hi = tl.minimum(b, row_lo + rows_per_split)
    col_lo = c_split * cols_per_split
    col_hi = tl.minimum(B, col_lo + cols_per_split)
    s = tl.load(SCALE)
    row_stat = n_col_splits * b  # stride between two statistics in ROWP
    col_stat = n_row_splits * B
    for m0 in range(row_lo, row_hi, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        rmask = rows < row_hi
        diag = rows + row_offset
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
        for n0 in range(col_lo, col_hi, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            cmask = cols < col_hi
            valid = rmask[:, None] & cmask[None, :]
            acc = dot_tile(X, Y, rows, cols, rmask, cmask, D, stride_x, stride_y, BLOCK_M, BLOCK_N, BLOCK_K)
            # each derived tile updates its rows, then (BOTH) its columns, and dies: few live tiles
            cp = COLP + r_split * B + cols  # this program's column slice, initialised by its first
            ld = cmask & (m0 > row_lo)      # row block, then merged
            if HAS_CE:
                lg = tl.where(valid, acc * s, float("-inf"))
                m_ce, z_ce = _lse_update(m_ce, z_ce, lg, 1)
                dg += tl.sum(tl.where(valid & (cols[None, :] == diag[:, None]), acc, 0.0), 1)
                if BOTH:
                    c_m, c_z = _lse_update(_load_stat(cp, M_CE * col_stat, ld, NEG_BIG),
                                           _load_stat(cp, Z_CE * col_stat, ld, 0.0), lg, 0)
                    tl.store(cp + M_CE * col_stat, c_m, mask=cmask)
                    tl.store(cp + Z_CE * col_stat, c_z, mask=cmask)
            if HAS_KL:
                acco = dot_tile(XO, YO, rows, cols, rmask, cmask, D, stride_xo, stride_yo, BLOCK_M, BLOCK_N,
                                BLOCK_K)
                if ARGMAX:
                    sov = tl.where(valid & (acco == acco), acco, float("-inf"))
                    am_v, am_i = _argmax_update(am_v, am_i, sov, cols[None, :], 1)
                    if BOTH:
                        c_v, c_i = _argmax_update(_load_stat(cp, AM_V * col_stat, ld, float("-inf")),
                                                  _load_stat(COLI + r_split * B + cols, 0, ld, 0), sov,
                                                  rows[:, None], 0)
                        tl.store(cp + AM_V * col_stat, c_v, mask=cmask)
                        tl.store(COLI + r_split * B + cols, c_i, mask=cmask)
                keep = valid
                if OFF_DIAG:
                    keep = keep & (cols[None, :] != diag[:, None])
                x = tl.where(keep, acc * inv_tau, float("-inf"))
                m, z = _lse_update(m, z, x, 1)
                if BOTH:
                    c_m, c_z = _lse_update(_load_stat(cp, M_KL * col_stat, ld, NEG_BIG),
                                           _load_stat(cp, Z_KL * col_stat, ld, 0.0), x, 0)
                    tl.store(cp + M_KL * col_stat, c_m, mask=cmask)
                    tl.store(cp + Z_KL * col_stat, c_z, mask=cmask)
                xo = tl.where(keep, acco * inv_tau, float("-inf"))
                diff = tl.where(keep, (acco - acc) * inv_tau, 0.0)
                mo, zo, cr = _cross_update(mo, zo, cr, xo, diff, 1)
                if BOTH:
                    c_mo, c_zo, c_cr = _cross_update(_load_stat(cp, M_OLD * col_stat, ld, NEG_BIG),
                                                     _load_stat(cp, Z_OLD * col_stat, ld, 0.0),
                                                     _load_stat(cp, CROSS * col_stat, ld, 0.0), xo, diff, 0)
                    tl.store(cp + M_OLD * col_stat, c_mo, mask=cmask)
                    tl.store(cp + Z_OLD * col_stat, c_zo, mask=cmask)
                    tl.store(cp + CROSS * col_stat, c_cr, mask=cmask)
            if BOTH:  # the next read of the slice may come from other threads of the program
                tl.debug_barrier()
        rp = ROWP + c_split * b + rows
        if HAS_CE:
            tl.store(rp + M_CE * row_stat, m_ce, mask=rmask)
            tl.store(rp + Z_CE * row_stat, z_ce, mask=rmask)
            tl.store(rp + DIAG * row_stat, dg, mask=rmask)
        if HAS_KL:
            tl.store(rp + M_KL * row_stat, m, mask=rmask)
            tl.store(rp + Z_KL * row_stat, z, mask=rmask)
            tl.store(rp + M_OLD * row_stat, mo, mask=rmask)
            tl.store(rp + Z_OLD * row_stat, zo, mask=rmask)
            tl.store(rp + CROSS * row_stat, cr, mask=rmask)
            if ARGMAX:
                tl.store(rp + AM_V * row_stat, am_v, mask=rmask)
                tl.store(ROWI + c_split * b + rows, am_i, mask=rmask)


@triton.jit
def _side_stats(STATS, idx, mask, n):
    """One side's per-item backward statistics (a [4, n] buffer): LSE of s·S, of S/τ, of S'/τ, and
    the KL weight mask·g_kl/τ."""
    lse_ce = tl.load(STATS + idx, mask=mask, other=0.0)
    lse = tl.load(STATS + n + idx, mask=mask, other=0.0)
    lse_o = tl.load(STATS + 2 * n + idx, mask=mask, other=0.0)
    w = tl.load(STATS + 3 * n + idx, mask=mask, other=0.0)
    return lse_ce, lse, lse_o, w


@triton.jit
def _grad_tile(A, Bf, AO, BO, own, other, omask, xmask, D, stride_a, stride_b, stride_ao, stride_bo, own_offset,
               other_offset, s, inv_tau, gce_own, gce_other, inv_norm, o_ce, o_lse, o_lse_o, o_w, x_ce, x_lse,
               x_lse_o, x_w, HAS_CE: tl.constexpr, HAS_KL: tl.constexpr, OFF_DIAG: tl.constexpr,
               OWN_STATS: tl.constexpr, OTHER_STATS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr):
    """(dLoss/dT / norm for the tile T = A[own]·B[other]ᵀ, recomputed from the features; per own
    row Σ of the cross-entropy part of dLoss/dT over s, times T: the logit-scale gradient). The
    sides with statistics contribute: own (T's rows) and other (T's columns)."""
    acc = dot_tile(A, Bf, own, other, omask, xmask, D, stride_a, stride_b, BLOCK_M, BLOCK_N, BLOCK_K)
    valid = omask[:, None] & xmask[None, :]
    is_pos = (own[:, None] + own_offset) == (other[None, :] + other_offset)
    g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    dsr = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_CE:
        onehot = tl.where(is_pos & valid, 1.0, 0.0)
        gc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if OWN_STATS:
            gc += gce_own * (tl.where(valid, tl.exp(acc * s - o_ce[:, None]), 0.0) - onehot)
        if OTHER_STATS:
            gc += gce_other * (tl.where(valid, tl.exp(acc * s - x_ce[None, :]), 0.0) - onehot)
        dsr = tl.sum(gc * acc, 1)
        g = gc * s
    if HAS_KL:
        acco = dot_tile(AO, BO, own, other, omask, xmask, D, stride_ao, stride_bo, BLOCK_M, BLOCK_N, BLOCK_K)
        keep = valid
        if OFF_DIAG:
            keep = keep & ~is_pos
        x = acc * inv_tau
        xo = acco * inv_tau
        if OWN_STATS:
            g += tl.where(keep, tl.exp(x - o_lse[:, None]) - tl.exp(xo - o_lse_o[:, None]), 0.0) * o_w[:, None]
        if OTHER_STATS:
            g += tl.where(keep, tl.exp(x - x_lse[None, :]) - tl.exp(xo - x_lse_o[None, :]), 0.0) * x_w[None, :]
    return g * inv_norm, dsr


@triton.jit
def _dot_grad(g, f, acc):
    """acc + g·f with the fp32 gradient tile g in the features' dtype (their MMA), fp32 accumulation."""
    if UPCAST:
        return tl.dot(g.to(f.dtype).to(tl.float32), f.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(g.to(f.dtype), f, acc, input_precision=FP32_PRECISION)


@triton.autotune(configs=_BWD_CONFIGS, key=_BWD_KEY, prune_configs_by={"early_config_prune": _prune_bwd})
@triton.jit
def _loss_bwd(A, Bf, AO, BO, SCALE, COEF, OWN, OTHER, DA, DSR, n_own, n_other, D, stride_a, stride_b, stride_ao,
              stride_bo, own_offset, other_offset, inv_tau, other_per_split, n_splits, own_class, other_class,
              HAS_CE: tl.constexpr, HAS_KL: tl.constexpr, OFF_DIAG: tl.constexpr, OWN_STATS: tl.constexpr,
              OTHER_STATS: tl.constexpr, SCALE_GRAD: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (own block, other split, feature chunk): DA[split, own rows, chunk] = Σ dLoss/dT ·
    B[other, chunk] over the split's tiles T = A[own]·B[other]ᵀ; with SCALE_GRAD, DSR[split, own
    rows] (by chunk 0). Launched for dX (A = X, own = rows of S) and for dY (A = Y, own = the
    columns of S: T = Sᵀ), so both accumulate over their MMA's rows. OWN/OTHER: the sides'
    backward statistics ([4, n]); COEF: (g_ce of own, g_ce of other, norm)."""
    pid = tl.program_id(0)
    n_d = tl.cdiv(D, BLOCK_D)
    d_chunk = pid % n_d
    split = (pid // n_d) % n_splits
    own = (pid // (n_d * n_splits)) * BLOCK_M + tl.arange(0, BLOCK_M)
    omask = own < n_own
    dd = d_chunk * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = dd < D
    lo = split * other_per_split
    hi = tl.minimum(n_other, lo + other_per_split)
    s = tl.load(SCALE)
    gce_own = tl.load(COEF)
    gce_other = tl.load(COEF + 1)
    norm = tl.load(COEF + 2)
    o_ce, o_lse, o_lse_o, o_w = _side_stats(OWN, own, omask & OWN_STATS, n_own)
    da = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dsr = tl.zeros([BLOCK_M], dtype=tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        other = n0 + tl.arange(0, BLOCK_N)
        xmask = other < hi
        x_ce, x_lse, x_lse_o, x_w = _side_stats(OTHER, other, xmask & OTHER_STATS, n_other)
        g, dsr_t = _grad_tile(A, Bf, AO, BO, own, other, omask, xmask, D, stride_a, stride_b, stride_ao, stride_bo,
                              own_offset, other_offset, s, inv_tau, gce_own, gce_other, 1.0 / norm, o_ce, o_lse,
                              o_lse_o, o_w, x_ce, x_lse, x_lse_o, x_w, HAS_CE, HAS_KL, OFF_DIAG, OWN_STATS,
                              OTHER_STATS, BLOCK_M, BLOCK_N, BLOCK_K)
        dsr += dsr_t
        bt = tl.load(Bf + other[:, None].to(tl.int64) * stride_b + dd[None, :], mask=xmask[:, None] & dmask[None, :],
                     other=0.0)
        da = _dot_grad(g, bt, da)
    out = DA + split.to(tl.int64) * n_own * D + own[:, None].to(tl.int64) * D + dd[None, :]
    tl.store(out, da * norm, mask=omask[:, None] & dmask[None, :])
    if SCALE_GRAD:
        if d_chunk == 0:
            tl.store(DSR + split * n_own + own, dsr, mask=omask)


# ---------------------------------------------------------------------------------------------
# launchers


def _features(x, y):
    """x and y contiguous in one dtype: their own when they agree, fp32 otherwise (tl.dot takes
    one operand dtype; the gradients still go back in each input's dtype)."""
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature dimensions differ: {x.shape[1]} and {y.shape[1]}")
    if x.dtype != y.dtype:
        x, y = x.float(), y.float()
    return x.contiguous(), y.contiguous()


def _lse_merge(m, z):
    """Merge online log-sum-exp partials over dim 0: (max, sum relative to it)."""
    top = m.max(0).values
    return top, (z * torch.exp(m - top)).sum(0)


def _merge_side(p, pi, dg, s, row_offset, want_ce, want_kl, keep_all):
    """A side's per-item results from its split partials p [N_STATS, splits, n] and pi [splits, n]:
    (ce, kl, kept, backward statistics [4, n]); the KL weight row is filled in by backward.
    keep_all: every item kept (selection "all"; the kernel took no argmax)."""
    n = p.shape[2]
    stats = torch.zeros(4, n, device=p.device, dtype=torch.float32)
    ce = kl = kept = None
    if want_ce:
        top, z = _lse_merge(p[M_CE.value], p[Z_CE.value])
        stats[0] = top + torch.log(z)
        ce = stats[0] - s * dg
    if want_kl:
        top, z = _lse_merge(p[M_KL.value], p[Z_KL.value])
        top_o, z_o = _lse_merge(p[M_OLD.value], p[Z_OLD.value])
        cross = (p[CROSS.value] * torch.exp(p[M_OLD.value] - top_o)).sum(0)
        if keep_all:
            kept = torch.ones(n, dtype=torch.bool, device=p.device)
        else:
            am_v = p[AM_V.value].max(0).values
            am_i = torch.where(p[AM_V.value] == am_v, pi, torch.iinfo(torch.int32).max).min(0).values
            kept = am_i == torch.arange(n, device=p.device) + row_offset
        kl = cross / z_o + ((top - top_o) + torch.log(z / z_o))  # well-conditioned LSE difference
        kl = torch.where(kept | torch.isnan(kl), kl, torch.zeros_like(kl))  # NaN scores stay visible
        stats[1], stats[2] = top + torch.log(z), top_o + torch.log(z_o)
    return ce, kl, kept, stats


def loss_forward(x, y, xo, yo, scale, row_offset, inv_tau, off_diag, want_ce, want_kl, keep_all, both):
    """Launch the forward kernel and merge its partials: per side (rows; columns with `both`)
    (ce, kl, kept, backward statistics)."""
    b, D = x.shape
    B = y.shape[0]
    programs = target_programs(x.device)
    if both:  # rows and columns split alike: √programs × √programs
        n_rs, rows_per = splits(b, 1, math.isqrt(programs))
        n_cs, cols_per = splits(B, n_rs, programs)
    else:  # one row unit per split, the columns split until the device is full
        n_rs, rows_per = triton.cdiv(b, SPLIT_ALIGN), SPLIT_ALIGN
        n_cs, cols_per = splits(B, n_rs, programs)
    dev = x.device
    rowp = torch.empty(N_STATS, n_cs, b, device=dev, dtype=torch.float32)
    rowi = torch.empty(n_cs, b, device=dev, dtype=torch.int32)
    colp = torch.empty(N_STATS, n_rs, B, device=dev, dtype=torch.float32) if both else rowp
    coli = torch.empty(n_rs, B, device=dev, dtype=torch.int32) if both else rowi
    if not want_ce:  # DIAG is read below either way
        rowp[DIAG.value].zero_()
    if b:
        _loss_fwd[(n_rs * n_cs,)](x, y, xo, yo, scale, rowp, rowi, colp, coli, b, B, D, x.stride(0),
                                  y.stride(0), xo.stride(0), yo.stride(0), row_offset, inv_tau, rows_per, cols_per,
                                  n_rs, n_cs, size_class(b), size_class(B), HAS_CE=want_ce, HAS_KL=want_kl,
                                  OFF_DIAG=off_diag, ARGMAX=want_kl and not keep_all, BOTH=both)
    dg = rowp[DIAG.value].sum(0)
    sides = [_merge_side(rowp, rowi, dg, scale, row_offset, want_ce, want_kl, keep_all)]
    if both:
        sides.append(_merge_side(colp, coli, dg, scale, 0, want_ce, want_kl, keep_all))
    return sides


def _block_d(D: int, dtype: torch.dtype) -> int:
    return min(triton.next_power_of_2(D), MAX_BLOCK_D[dtype == torch.float32])


def _grad_out(parts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The gradient in `dtype` from its split partials [splits, n, D] (fp32)."""
    return (parts[0] if parts.shape[0] == 1 else parts.sum(0)).to(dtype)


def _backward_side(a, b_, ao, bo, scale, coef, own_stats, other_stats, own_offset, other_offset, inv_tau,
                   off_diag, want_ce, want_kl, flags, scale_grad):
    """One launch of _loss_bwd (A = a, B = b_): (dA fp32 split partials [splits, n_own, D], the
    logit-scale gradient's share | None)."""
    n_own, D = a.shape
    n_other = b_.shape[0]
    dev = a.device
    block_d = _block_d(D, a.dtype)
    n_d = triton.cdiv(D, block_d)
    n_splits, per_split = splits(n_other, triton.cdiv(n_own, SPLIT_ALIGN) * n_d, target_programs(dev))
    da = torch.empty(n_splits, n_own, D, device=dev, dtype=torch.float32)
    dsr = torch.empty(n_splits, n_own, device=dev, dtype=torch.float32) if scale_grad else da
    if n_own:
        grid = lambda meta: (triton.cdiv(n_own, meta["BLOCK_M"]) * n_splits * n_d,)  # noqa: E731
        _loss_bwd[grid](a, b_, ao, bo, scale, coef, own_stats, other_stats, da, dsr, n_own, n_other, D, a.stride(0),
                        b_.stride(0), ao.stride(0), bo.stride(0), own_offset, other_offset, inv_tau, per_split,
                        n_splits, size_class(n_own), size_class(n_other), HAS_CE=want_ce, HAS_KL=want_kl,
                        OFF_DIAG=off_diag, OWN_STATS=flags[0], OTHER_STATS=flags[1], SCALE_GRAD=scale_grad,
                        BLOCK_D=block_d)
    return da, (dsr.sum() if scale_grad else None)


def loss_backward(x, y, xo, yo, scale, gce, norm, row_stats, col_stats, row_offset, inv_tau, off_diag, want_ce,
                  want_kl, both, need_x, need_y, need_s):
    """The backward launches: (dX fp32 partials | None, dY fp32 partials | None, Σ ds | None).
    dX: own = X's rows; dY: own = Y's rows (the columns of S), with the roles of the sides swapped."""
    col_stats = row_stats if col_stats is None else col_stats
    common = (inv_tau, off_diag, want_ce, want_kl)
    dx = dy = dsum = None
    if need_x or need_s:
        coef = torch.stack([gce[0], gce[1], norm]).contiguous()
        dx, dsum = _backward_side(x, y, xo, yo, scale, coef, row_stats, col_stats, row_offset, 0, *common,
                                  (True, both), need_s)
    if need_y:
        coef = torch.stack([gce[1], gce[0], norm]).contiguous()
        dy, _ = _backward_side(y, x, yo, xo, scale, coef, col_stats, row_stats, 0, row_offset, *common,
                               (both, True), False)
    return dx, dy, dsum


class LossFunction(torch.autograd.Function):
    """(Σ ce_rows, Σ ce_cols, Σ kl_rows, Σ kl_cols, kept_rows, kept_cols): the CLIP cross-entropy
    (want_ce) and Mod-X's masked KL (want_kl; every row with keep_all) of the rows (X's direction)
    and, with `both`, of the columns (Y's direction; zeros without it), from the same tiles."""

    @staticmethod
    def forward(ctx, x, y, xo, yo, scale, row_offset, inv_tau, off_diag, want_ce, want_kl, keep_all, both):
        xf, yf = _features(x, y)
        xof, yof = _features(xo, yo) if want_kl else (xf, yf)
        scale_f = scale.detach().reshape(-1)[:1].float().contiguous()
        sides = loss_forward(xf, yf, xof, yof, scale_f, row_offset, inv_tau, off_diag, want_ce, want_kl, keep_all,
                             both)
        zero = torch.zeros((), device=x.device, dtype=torch.float32)
        out = []
        for k in range(3):  # ce, kl, kept
            for side in (sides + [None])[:2]:
                val = None if side is None else side[k]
                out.append(zero.clone() if val is None else val.sum())
        ce_r, ce_c, kl_r, kl_c, kept_r, kept_c = out
        ctx.save_for_backward(xf, yf, xof, yof, scale, scale_f, *(s[3] for s in sides),
                              *(s[2].float() if want_kl else zero for s in sides))
        ctx.cfg = (row_offset, inv_tau, off_diag, want_ce, want_kl, both, x.dtype, y.dtype)
        kept_r, kept_c = kept_r.long(), kept_c.long()
        ctx.mark_non_differentiable(kept_r, kept_c)
        return ce_r, ce_c, kl_r, kl_c, kept_r, kept_c

    @staticmethod
    def backward(ctx, g_ce_r, g_ce_c, g_kl_r, g_kl_c, _g_kept_r, _g_kept_c):
        row_offset, inv_tau, off_diag, want_ce, want_kl, both, x_dtype, y_dtype = ctx.cfg
        x, y, xo, yo, scale, scale_f, *rest = ctx.saved_tensors
        n_sides = 2 if both else 1
        stats, kept = rest[:n_sides], rest[n_sides:]
        dev = x.device

        def grad(g, on):
            return g.detach().float().reshape(()) if (on and g is not None) else torch.zeros((), device=dev)

        gce = [grad(g_ce_r, want_ce), grad(g_ce_c, want_ce and both)]
        stats, weights = [st.clone() for st in stats], []
        for st, k, g in zip(stats, kept, (g_kl_r, g_kl_c)):
            st[3] = k * grad(g, want_kl) * inv_tau  # the KL weight of every item of the side
            weights.append(st[3].abs().max() if st.shape[1] else torch.zeros((), device=dev))
        # dS is divided by its largest coefficient before it is cast to the features' dtype
        norm = torch.stack([(scale_f[0] * gce[0]).abs(), (scale_f[0] * gce[1]).abs(), *weights]).max()
        norm = torch.where(norm > 0, norm, torch.ones_like(norm))
        need_x, need_y = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_s = want_ce and ctx.needs_input_grad[4]
        dx, dy, dsum = loss_backward(x, y, xo, yo, scale_f, gce, norm, stats[0], stats[1] if both else None,
                                     row_offset, inv_tau, off_diag, want_ce, want_kl, both, need_x, need_y, need_s)
        gx = _grad_out(dx, x_dtype) if need_x else None
        gy = _grad_out(dy, y_dtype) if need_y else None
        gs = dsum.to(scale.dtype).reshape(scale.shape) if need_s else None
        return gx, gy, None, None, gs, None, None, None, None, None, None, None


def _apply(x, y, xo, yo, scale, row_offset, options, want_ce, both, names):
    want_kl, inv_tau, off_diag = kl_switches(options)
    features = dict(zip(names, (x, y, xo, yo) if want_kl else (x, y)))
    check_inputs(features, {"logit_scale": scale})
    if not want_kl:
        xo, yo = x, y
    keep_all = want_kl and options.selection == "all"
    return LossFunction.apply(x, y, xo, yo, scale, int(row_offset), inv_tau, off_diag, bool(want_ce), want_kl,
                              keep_all, both)


def direction(x, y, xo, yo, scale, row_offset, options: ModxOptions | None, want_ce: bool):
    """(Σ ce_i, Σ kl_i, kept) of one direction (local rows x against columns y)."""
    ce, _, kl, _, kept, _ = _apply(x, y, xo, yo, scale, row_offset, options, want_ce, both=False,
                                   names=("local rows", "gathered columns", "old-model local rows",
                                          "old-model gathered columns"))
    return ce, kl, kept


def fused(image, text, image_old, text_old, scale, options: ModxOptions | None, want_ce: bool):
    """Full batch, both directions from one pass over the tiles:
    (Σce_i2t, Σce_t2i, Σkl_i2t, Σkl_t2i, kept_i2t, kept_t2i)."""
    return _apply(image, text, image_old, text_old, scale, 0, options, want_ce, both=True,
                  names=("image", "text", "image_old", "text_old"))


LOSSES = RowLosses(direction, fused)
