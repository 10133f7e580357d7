"""Tiled torch backend of the CLIP and Mod-X losses (the CPU path; the direction quantities and
conventions are in losses.py).

`_RowLossTorch` computes one direction's sums Σ_i ce_i and Σ_i kl_i with tiles of R rows × all B
columns (two GEMMs per tile, elementwise work on cache-sized buffers), stores only per-row
statistics (LSEs, mask), and recomputes the tiles in backward: dS = g_ce·s·(P_ce − onehot) +
g_kl·mask·(P − P')/τ, dX = dS·Y, dY += dSᵀ·X, ds = g_ce·Σ (P_ce − onehot)·S. No B×B buffer ever
exists; the buffers are a few R×B tiles with R·B ≈ losses.TILE_ELEMS.

For the full batch (no data-parallel arguments) `_FusedTorch` does both directions from ONE tile
of S per row block: row statistics exactly, column statistics (text→image: LSEs, the old model's
column argmax, the KL cross term) online across row tiles, so forward costs 2 GEMMs and backward 4
(recompute S, S'; dI = dS·T, dT += dSᵀ·I) — fewer than the dense formula's autograd.

Tiles are float64 for float64 inputs and fp32 otherwise (losses.accumulation_dtype). With
selection "all" (LwF, ZSCL) every row is kept: the masks are all ones and no argmax is taken.
"""
from __future__ import annotations

import functools
import math

import torch

from .losses import ModxOptions, RowLosses, accumulation_dtype, kl_switches, tile_rows


def _scalar(x) -> float:
    return float(x.detach().reshape(-1)[0]) if torch.is_tensor(x) else float(x)


def _no_autocast(fn):
    """Run a Function's forward/backward with autocast off: the tiles are computed in the
    accumulation dtype by design."""
    @functools.wraps(fn)
    def wrapped(ctx, *args):
        t = next(a for a in args if torch.is_tensor(a))
        with torch.autocast(t.device.type, enabled=False):
            return fn(ctx, *args)
    return wrapped


def _kl_rows(S, So, mrow, ridx, dcol, inv_tau, off_diag, scratch, diff):
    """One tile of rows: (LSE of S/τ, LSE of S'/τ, masked KL(P'‖P)) per row.

    S and So (the current and old similarities) are scaled by 1/τ and, with off_diag, get −inf on
    the diagonal, in place; `diff` receives x' − x (0 on a masked diagonal), `scratch` is a buffer
    of the tile's shape. `diff` may be So itself when the caller no longer needs it."""
    if inv_tau != 1.0:
        S.mul_(inv_tau)
        So.mul_(inv_tau)
    if off_diag:
        S[ridx, dcol] = -math.inf
        So[ridx, dcol] = -math.inf
    m = S.amax(1, keepdim=True)
    z = torch.sub(S, m, out=scratch).exp_().sum(1)
    lse = m.squeeze(1) + z.log()
    mo = So.amax(1, keepdim=True)
    Po = torch.sub(So, mo, out=scratch).exp_()
    zo = Po.sum(1)
    lse_o = mo.squeeze(1) + zo.log()
    dlse = (m - mo).squeeze(1) + torch.log(z / zo)  # LSE(x) − LSE(x'), well conditioned
    Po.div_(zo.unsqueeze(1))
    D = torch.sub(So, S, out=diff)  # x' − x (nan on a −inf diagonal, where P' = 0)
    if off_diag:
        D[ridx, dcol] = 0.0
    cross = Po.mul_(D).sum(1)
    return lse, lse_o, torch.where(mrow, cross + dlse, torch.zeros_like(cross))


class _RowLossTorch(torch.autograd.Function):
    """(Σ ce_i, Σ kl_i, kept) of one direction; see the module docstring."""

    @staticmethod
    @_no_autocast
    def forward(ctx, x, y, xo, yo, scale, row_offset, inv_tau, off_diag, want_ce, want_kl, keep_all):
        b, B = x.shape[0], y.shape[0]
        dev, acc = x.device, accumulation_dtype(x, y)
        yf = y.to(acc)
        yof = yo.to(acc) if want_kl else None
        s = _scalar(scale) if want_ce else 0.0
        R = tile_rows(b, B)
        buf_a = torch.empty(R, B, dtype=acc, device=dev)
        buf_b = torch.empty(R, B, dtype=acc, device=dev) if want_kl else None
        buf_c = torch.empty(R, B, dtype=acc, device=dev)
        ce = torch.zeros(b, dtype=acc, device=dev)
        lse_ce = torch.zeros(b, dtype=acc, device=dev)
        kl = torch.zeros(b, dtype=acc, device=dev)
        lse = torch.zeros(b, dtype=acc, device=dev)
        lse_o = torch.zeros(b, dtype=acc, device=dev)
        mask = torch.zeros(b, dtype=torch.bool, device=dev)
        for r0 in range(0, b, R):
            r1 = min(b, r0 + R)
            n = r1 - r0
            ridx = torch.arange(n, device=dev)
            dcol = ridx + (row_offset + r0)
            S = torch.matmul(x[r0:r1].to(acc), yf.T, out=buf_a[:n])
            if want_ce:
                E = torch.mul(S, s, out=buf_c[:n])
                m = E.amax(1, keepdim=True)
                lse_r = m.squeeze(1) + E.sub_(m).exp_().sum(1).log_()
                lse_ce[r0:r1] = lse_r
                ce[r0:r1] = lse_r - s * S[ridx, dcol]
            if want_kl:
                So = torch.matmul(xo[r0:r1].to(acc), yof.T, out=buf_b[:n])
                mrow = torch.ones(n, dtype=torch.bool, device=dev) if keep_all else So.argmax(1) == dcol
                mask[r0:r1] = mrow
                # So is not needed after this tile: x' − x overwrites it
                lse[r0:r1], lse_o[r0:r1], kl[r0:r1] = _kl_rows(S, So, mrow, ridx, dcol, inv_tau, off_diag,
                                                               buf_c[:n], diff=So)
        ctx.save_for_backward(x, y, xo, yo, scale if torch.is_tensor(scale) else None,
                              lse_ce, lse, lse_o, mask)
        ctx.cfg = (row_offset, inv_tau, off_diag, want_ce, want_kl, R, s)
        kept = mask.sum()
        ctx.mark_non_differentiable(kept)
        return ce.sum(), kl.sum(), kept

    @staticmethod
    @_no_autocast
    def backward(ctx, g_ce, g_kl, _g_kept):
        x, y, xo, yo, scale, lse_ce, lse, lse_o, mask = ctx.saved_tensors
        row_offset, inv_tau, off_diag, want_ce, want_kl, R, s = ctx.cfg
        gce = _scalar(g_ce) if (want_ce and g_ce is not None) else 0.0
        gkl = _scalar(g_kl) if (want_kl and g_kl is not None) else 0.0
        b, B = x.shape[0], y.shape[0]
        dev, acc = x.device, accumulation_dtype(x, y)
        need_x, need_y = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_s = want_ce and ctx.needs_input_grad[4]
        yf = y.to(acc)
        yof = yo.to(acc) if want_kl else None
        dx = torch.zeros(b, x.shape[1], dtype=acc, device=dev) if need_x else None
        dy = torch.zeros(B, y.shape[1], dtype=acc, device=dev) if need_y else None
        ds = torch.zeros((), dtype=acc, device=dev)
        do_ce, do_kl = gce != 0.0, gkl != 0.0 and bool(mask.any())
        if (do_ce or do_kl) and (need_x or need_y or need_s):
            buf_a = torch.empty(R, B, dtype=acc, device=dev)
            buf_g = torch.empty(R, B, dtype=acc, device=dev)
            buf_b = torch.empty(R, B, dtype=acc, device=dev) if do_kl else None
            for r0 in range(0, b, R):
                r1 = min(b, r0 + R)
                n = r1 - r0
                mrow = mask[r0:r1]
                tile_kl = do_kl and bool(mrow.any())
                if not (do_ce or tile_kl):
                    continue
                ridx = torch.arange(n, device=dev)
                dcol = ridx + (row_offset + r0)
                xb = x[r0:r1].to(acc)
                S = torch.matmul(xb, yf.T, out=buf_a[:n])
                G = buf_g[:n]
                if do_ce:
                    torch.mul(S, s, out=G)
                    G.sub_(lse_ce[r0:r1].unsqueeze(1)).exp_()
                    G[ridx, dcol] -= 1.0
                    if need_s:
                        ds += torch.dot(G.reshape(-1), S.reshape(-1))
                    G.mul_(gce * s)
                else:
                    G.zero_()
                if tile_kl:
                    So = torch.matmul(xo[r0:r1].to(acc), yof.T, out=buf_b[:n])
                    P = S.mul_(inv_tau).sub_(lse[r0:r1].unsqueeze(1)).exp_()
                    Po = So.mul_(inv_tau).sub_(lse_o[r0:r1].unsqueeze(1)).exp_()
                    if off_diag:
                        P[ridx, dcol] = 0.0
                        Po[ridx, dcol] = 0.0
                    w = (mrow.to(acc) * (gkl * inv_tau)).unsqueeze(1)
                    G.add_(P.sub_(Po).mul_(w))
                if need_x:
                    torch.matmul(G, yf, out=dx[r0:r1])
                if need_y:
                    dy.addmm_(G.T, xb)
        gx = dx.to(x.dtype) if need_x else None
        gy = dy.to(y.dtype) if need_y else None
        gs = None
        if need_s and scale is not None:
            gs = (ds * gce).to(scale.dtype).reshape(scale.shape)
        return gx, gy, None, None, gs, None, None, None, None, None, None


def _col_update(V, m, z, tmp, extra=None, c=None):
    """Online column log-sum-exp: fold the tile V (n×B) into running max m and sum z (and, for the
    KL cross term, c += Σ_rows exp(V − m)·extra)."""
    new_m = torch.maximum(m, V.amax(0))
    safe = torch.where(torch.isinf(new_m), torch.zeros_like(new_m), new_m)
    scale = torch.exp(m - safe)
    E = torch.sub(V, safe, out=tmp).exp_()
    z.mul_(scale).add_(E.sum(0))
    if c is not None:
        c.mul_(scale).add_(E.mul_(extra).sum(0))
    m.copy_(new_m)


def _lse(m, z):
    return m + z.log()


class _FusedTorch(torch.autograd.Function):
    """Full batch, both directions from one tile of S = I Tᵀ (and S' = I' T'ᵀ): row statistics
    (image→text) exactly per tile, column statistics (text→image) online across row tiles.
    Returns (Σ ce_i2t, Σ ce_t2i, Σ kl_i2t, Σ kl_t2i, kept_i2t, kept_t2i)."""

    @staticmethod
    @_no_autocast
    def forward(ctx, image, text, image_old, text_old, scale, inv_tau, off_diag, want_ce, want_kl, keep_all):
        B = image.shape[0]
        dev, acc = image.device, accumulation_dtype(image, text)
        tf = text.to(acc)
        tof = text_old.to(acc) if want_kl else None
        s = _scalar(scale) if want_ce else 0.0
        R = tile_rows(B, B)
        A = torch.empty(R, B, dtype=acc, device=dev)
        Bo = torch.empty(R, B, dtype=acc, device=dev) if want_kl else None
        C = torch.empty(R, B, dtype=acc, device=dev)
        D = torch.empty(R, B, dtype=acc, device=dev)
        full = lambda v: torch.full((B,), v, dtype=acc, device=dev)
        diag_sum = torch.zeros((), dtype=acc, device=dev)
        lse_ce_r = torch.zeros(B, dtype=acc, device=dev)
        cm_ce, cz_ce = full(-math.inf), full(0.0)
        lse_r, lse_or = torch.zeros(B, dtype=acc, device=dev), torch.zeros(B, dtype=acc, device=dev)
        mask_r = torch.zeros(B, dtype=torch.bool, device=dev)
        kl_r = torch.zeros(B, dtype=acc, device=dev)
        cm, cz, cmo, czo, cc = full(-math.inf), full(0.0), full(-math.inf), full(0.0), full(0.0)
        am_val, am_idx = full(-math.inf), torch.zeros(B, dtype=torch.long, device=dev)
        for r0 in range(0, B, R):
            r1 = min(B, r0 + R)
            n = r1 - r0
            ridx = torch.arange(n, device=dev)
            dcol = ridx + r0
            S = torch.matmul(image[r0:r1].to(acc), tf.T, out=A[:n])
            if want_ce:
                diag_sum += S[ridx, dcol].sum()
                L = torch.mul(S, s, out=C[:n])
                _col_update(L, cm_ce, cz_ce, D[:n])  # reads L, writes D: L is still s·S
                m = L.amax(1, keepdim=True)
                lse_ce_r[r0:r1] = m.squeeze(1) + L.sub_(m).exp_().sum(1).log_()
            if want_kl:
                So = torch.matmul(image_old[r0:r1].to(acc), tof.T, out=Bo[:n])
                if keep_all:
                    mrow = torch.ones(n, dtype=torch.bool, device=dev)
                else:
                    mrow = So.argmax(1) == dcol
                    v, i = So.max(0)  # the old model's column argmax, online (first index on ties)
                    am_idx = torch.where(v > am_val, i + r0, am_idx)
                    am_val = torch.maximum(am_val, v)
                mask_r[r0:r1] = mrow
                # rows; So and x' − x (in D) are still needed for the columns
                Dx = D[:n]
                lse_r[r0:r1], lse_or[r0:r1], kl_r[r0:r1] = _kl_rows(S, So, mrow, ridx, dcol, inv_tau,
                                                                    off_diag, C[:n], diff=Dx)
                # columns (online)
                _col_update(S, cm, cz, C[:n])
                _col_update(So, cmo, czo, C[:n], extra=Dx, c=cc)
        ar = torch.arange(B, device=dev)
        out_ce_i = out_ce_t = out_kl_i = out_kl_t = torch.zeros((), dtype=acc, device=dev)
        lse_ce_c = _lse(cm_ce, cz_ce) if want_ce else None
        if want_ce:
            out_ce_i = lse_ce_r.sum() - s * diag_sum
            out_ce_t = lse_ce_c.sum() - s * diag_sum
        mask_c = torch.zeros(B, dtype=torch.bool, device=dev)
        lse_c = lse_oc = None
        if want_kl:
            mask_c = torch.ones(B, dtype=torch.bool, device=dev) if keep_all else am_idx == ar
            lse_c, lse_oc = _lse(cm, cz), _lse(cmo, czo)
            kl_c = torch.where(mask_c, cc / czo + ((cm - cmo) + torch.log(cz / czo)), torch.zeros_like(cc))
            out_kl_i, out_kl_t = kl_r.sum(), kl_c.sum()
        ctx.save_for_backward(image, text, image_old, text_old, scale, lse_ce_r,
                              lse_ce_c if want_ce else lse_ce_r, lse_r, lse_or,
                              lse_c if want_kl else lse_r, lse_oc if want_kl else lse_r, mask_r, mask_c)
        ctx.cfg = (inv_tau, off_diag, want_ce, want_kl, R, s)
        kept_i, kept_t = mask_r.sum(), mask_c.sum()
        ctx.mark_non_differentiable(kept_i, kept_t)
        return out_ce_i, out_ce_t, out_kl_i, out_kl_t, kept_i, kept_t

    @staticmethod
    @_no_autocast
    def backward(ctx, g_cei, g_cet, g_kli, g_klt, _gk1, _gk2):
        (image, text, image_old, text_old, scale, lse_ce_r, lse_ce_c, lse_r, lse_or, lse_c, lse_oc,
         mask_r, mask_c) = ctx.saved_tensors
        inv_tau, off_diag, want_ce, want_kl, R, s = ctx.cfg
        f = lambda g, on: _scalar(g) if (on and g is not None) else 0.0
        gcei, gcet = f(g_cei, want_ce), f(g_cet, want_ce)
        gkli, gklt = f(g_kli, want_kl), f(g_klt, want_kl)
        B, dev, acc = image.shape[0], image.device, accumulation_dtype(image, text)
        need_i, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_s = want_ce and ctx.needs_input_grad[4]
        tf = text.to(acc)
        tof = text_old.to(acc) if want_kl else None
        di = torch.zeros(B, image.shape[1], dtype=acc, device=dev) if need_i else None
        dt = torch.zeros(B, text.shape[1], dtype=acc, device=dev) if need_t else None
        ds = torch.zeros((), dtype=acc, device=dev)
        do_ce = gcei != 0.0 or gcet != 0.0
        do_kl = (gkli != 0.0 and bool(mask_r.any())) or (gklt != 0.0 and bool(mask_c.any()))
        if (do_ce or do_kl) and (need_i or need_t or need_s):
            A, G, C = (torch.empty(R, B, dtype=acc, device=dev) for _ in range(3))
            Bo = torch.empty(R, B, dtype=acc, device=dev) if do_kl else None
            wc = (mask_c.to(acc) * (gklt * inv_tau)).unsqueeze(0) if do_kl else None
            for r0 in range(0, B, R):
                r1 = min(B, r0 + R)
                n = r1 - r0
                ridx = torch.arange(n, device=dev)
                dcol = ridx + r0
                ib = image[r0:r1].to(acc)
                S = torch.matmul(ib, tf.T, out=A[:n])
                Gt = G[:n]
                Gt.zero_()
                if do_ce:
                    if gcei != 0.0:
                        Pr = torch.mul(S, s, out=C[:n]).sub_(lse_ce_r[r0:r1].unsqueeze(1)).exp_()
                        Gt.add_(Pr, alpha=gcei)
                    if gcet != 0.0:
                        Pc = torch.mul(S, s, out=C[:n]).sub_(lse_ce_c.unsqueeze(0)).exp_()
                        Gt.add_(Pc, alpha=gcet)
                    Gt[ridx, dcol] -= gcei + gcet
                    if need_s:
                        ds += torch.dot(Gt.reshape(-1), S.reshape(-1))
                    Gt.mul_(s)
                if do_kl:
                    So = torch.matmul(image_old[r0:r1].to(acc), tof.T, out=Bo[:n])
                    if inv_tau != 1.0:
                        S.mul_(inv_tau)
                        So.mul_(inv_tau)
                    if off_diag:
                        S[ridx, dcol] = -math.inf
                        So[ridx, dcol] = -math.inf
                    wr = (mask_r[r0:r1].to(acc) * (gkli * inv_tau)).unsqueeze(1)
                    # rows: wr·(P − P'), columns: wc·(P − P')
                    for V, lse_v, w, sign in ((S, lse_r[r0:r1].unsqueeze(1), wr, 1.0),
                                              (So, lse_or[r0:r1].unsqueeze(1), wr, -1.0),
                                              (S, lse_c.unsqueeze(0), wc, 1.0),
                                              (So, lse_oc.unsqueeze(0), wc, -1.0)):
                        P = torch.sub(V, lse_v, out=C[:n]).exp_()  # 0 on a −inf diagonal
                        Gt.addcmul_(P, w, value=sign)
                if need_i:
                    torch.matmul(Gt, tf, out=di[r0:r1])
                if need_t:
                    dt.addmm_(Gt.T, ib)
        gs = ds.to(scale.dtype).reshape(scale.shape) if need_s else None
        return (di.to(image.dtype) if need_i else None, dt.to(text.dtype) if need_t else None,
                None, None, gs, None, None, None, None, None)


def fused(image, text, image_old, text_old, scale, options: ModxOptions | None, want_ce: bool):
    """Full batch, both directions in one pass: (Σce_i2t, Σce_t2i, Σkl_i2t, Σkl_t2i, kept_i2t, kept_t2i)."""
    want_kl, inv_tau, off_diag = kl_switches(options)
    if not want_kl:
        image_old = text_old = image.new_zeros(0)
    keep_all = want_kl and options.selection == "all"
    return _FusedTorch.apply(image, text, image_old, text_old, scale, inv_tau, off_diag, bool(want_ce), want_kl,
                             keep_all)


def direction(x, y, xo, yo, scale, row_offset, options: ModxOptions | None, want_ce: bool):
    """(Σ ce_i, Σ kl_i, kept) of one direction with the tiled torch kernel."""
    want_kl, inv_tau, off_diag = kl_switches(options)
    if not want_kl:
        xo = yo = x.new_zeros(0)
    keep_all = want_kl and options.selection == "all"
    return _RowLossTorch.apply(x, y, xo, yo, scale, int(row_offset), inv_tau, off_diag, bool(want_ce), want_kl,
                               keep_all)


LOSSES = RowLosses(direction, fused)
