"""Similarity, streamed top-k and streamed retrieval ranks as Triton kernels, Liger-Kernel style:
``@triton.jit`` kernels and plain launchers (the conventions are in ranking.py). Autotuned block
sizes on the GPU, one fixed configuration under ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import INTERPRET, check_features, configs, dot_tile
from .ranking import best_caption, caption_image_rows, check_pair


def _gpu_configs(space: list[tuple]) -> list[triton.Config]:
    return [triton.Config(dict(zip(("BLOCK_M", "BLOCK_N", "BLOCK_K"), c[:3])), num_warps=c[3], num_stages=c[4])
            for c in space]


_INTERPRETER_CONFIG = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)
_GEMM_CONFIGS = configs(_INTERPRETER_CONFIG, _gpu_configs(
    [(128, 128, 32, 8, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (64, 64, 64, 4, 3), (128, 128, 64, 8, 3)]))
_SELECT_CONFIGS = configs(_INTERPRETER_CONFIG, _gpu_configs(
    [(64, 64, 32, 4, 3), (64, 128, 32, 4, 3), (128, 64, 32, 8, 3), (32, 128, 32, 4, 3)]))


@triton.autotune(configs=_GEMM_CONFIGS, key=["M", "N", "K", "IEEE"])
@triton.jit
def _similarity_kernel(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_bn, stride_cm,
                       IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = dot_tile(a_ptr, b_ptr, rows, cols, rows < M, cols < N, K, stride_am, stride_bn,
                   BLOCK_M, BLOCK_N, BLOCK_K, IEEE)
    tl.store(c_ptr + rows[:, None].to(tl.int64) * stride_cm + cols[None, :], acc,
             mask=(rows[:, None] < M) & (cols[None, :] < N))


@triton.autotune(configs=_SELECT_CONFIGS, key=["M", "N", "K", "IEEE", "TOPK"])
@triton.jit
def _topk_kernel(q_ptr, g_ptr, v_ptr, i_ptr, M, N, K, stride_qm, stride_gn, TOPK,
                 K_PAD: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Running top-k of BLOCK_M query rows over all gallery tiles (registers only).

    Slots [0, TOPK) hold the current best (score, index) set; slots ≥ TOPK are dummies at +inf.
    Per tile, `rounds` = the largest number of entries of a row above its current minimum
    (≤ TOPK); each round moves every row's best remaining tile entry (smallest index on ties)
    into the slot of its current minimum (largest index on ties) when it is strictly better."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    slots = tl.arange(0, K_PAD)
    real = slots[None, :] < TOPK
    run_v = tl.where(real, float("-inf"), float("inf")) + tl.zeros((BLOCK_M, K_PAD), tl.float32)
    # unique sentinel indices: -1 - slot for empty real slots, huge for dummies
    slots64 = slots.to(tl.int64)[None, :] + tl.zeros((BLOCK_M, K_PAD), tl.int64)
    run_i = tl.where(real, -1 - slots64, 2**62 + slots64)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        s = dot_tile(q_ptr, g_ptr, rows, cols, rows < M, cols < N, K, stride_qm, stride_gn,
                     BLOCK_M, BLOCK_N, BLOCK_K, IEEE)
        gidx = cols.to(tl.int64)[None, :] + tl.zeros((BLOCK_M, BLOCK_N), tl.int64)
        s = tl.where(cols[None, :] < N, s, float("-inf"))
        thr = tl.min(run_v, 1)
        cnt = tl.sum((s > thr[:, None]).to(tl.int32), 1)
        rounds = tl.minimum(tl.max(cnt, 0), TOPK)
        for _ in range(0, rounds):
            best = tl.max(s, 1)
            arg = tl.min(tl.where(s == best[:, None], gidx, 2**62), 1)
            rmin = tl.min(run_v, 1)
            evict = tl.max(tl.where(run_v == rmin[:, None], run_i, -(2**62)), 1)
            hit = (best > rmin)[:, None] & (run_i == evict[:, None])
            run_v = tl.where(hit, best[:, None], run_v)
            run_i = tl.where(hit, arg[:, None], run_i)
            s = tl.where(gidx == arg[:, None], float("-inf"), s)
    out = rows[:, None].to(tl.int64) * TOPK + slots[None, :]
    omask = (rows[:, None] < M) & real
    tl.store(v_ptr + out, run_v, mask=omask)
    tl.store(i_ptr + out, run_i, mask=omask)


@triton.jit
def _positive_kernel(q_ptr, g_ptr, p_ptr, pos_ptr, M, K, stride_qm, stride_gn,
                     IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """pos[m] = q[m]·g[p[m]] with the tile arithmetic (the diagonal of a gathered tile);
    -inf where p[m] < 0 (no positive)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    p = tl.load(p_ptr + rows, mask=rows < M, other=-1)
    has = p >= 0
    acc = dot_tile(q_ptr, g_ptr, rows, tl.maximum(p, 0), rows < M, has, K, stride_qm, stride_gn,
                   BLOCK_M, BLOCK_M, BLOCK_K, IEEE)  # row m against positive p[m]: the diagonal
    eye = tl.arange(0, BLOCK_M)[:, None] == tl.arange(0, BLOCK_M)[None, :]
    pos = tl.sum(tl.where(eye, acc, 0.0), 1)
    tl.store(pos_ptr + rows, tl.where(has, pos, float("-inf")), mask=rows < M)


@triton.autotune(configs=_SELECT_CONFIGS, key=["M", "N", "K", "IEEE"])
@triton.jit
def _rank_kernel(q_ptr, g_ptr, pos_ptr, p_ptr, out_ptr, M, N, K, stride_qm, stride_gn,
                 IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """rank[m] = #{n ≠ p[m]: s_mn > pos[m]} + #{n < p[m]: s_mn == pos[m]}, tile by tile."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    pos = tl.load(pos_ptr + rows, mask=rows < M, other=float("inf"))
    p = tl.load(p_ptr + rows, mask=rows < M, other=-1)
    cnt = tl.zeros((BLOCK_M,), dtype=tl.int64)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        s = dot_tile(q_ptr, g_ptr, rows, cols, rows < M, cols < N, K, stride_qm, stride_gn,
                     BLOCK_M, BLOCK_N, BLOCK_K, IEEE)
        c = cols[None, :].to(tl.int64)
        valid = cols[None, :] < N
        hit = valid & (c != p[:, None]) & (s > pos[:, None])
        hit |= valid & (c < p[:, None]) & (s == pos[:, None])
        cnt += tl.sum(hit.to(tl.int64), 1)
    tl.store(out_ptr + rows, cnt, mask=rows < M)


def _triton_inputs(a: torch.Tensor, b: torch.Tensor):
    """(a, b, ieee): checked, contiguous, one dtype (fp32 when they differ); ieee for fp32."""
    check_pair(a, b)
    check_features(a, b)
    if a.dtype != b.dtype:
        a, b = a.float(), b.float()
    return a.contiguous(), b.contiguous(), a.dtype == torch.float32


def similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b, ieee = _triton_inputs(a, b)
    M, N, K = a.shape[0], b.shape[0], a.shape[1]
    c = torch.empty(M, N, device=a.device, dtype=torch.float32)
    if M and N:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))  # noqa: E731
        _similarity_kernel[grid](a, b, c, M, N, K, a.stride(0), b.stride(0), c.stride(0), IEEE=ieee)
    return c


def _sort_lists(v: torch.Tensor, i: torch.Tensor):
    """Order each row by (score desc, index asc)."""
    o = torch.argsort(i, dim=1)
    v, i = torch.gather(v, 1, o), torch.gather(i, 1, o)
    o = torch.sort(v, dim=1, descending=True, stable=True).indices
    return torch.gather(v, 1, o), torch.gather(i, 1, o)


def topk(queries: torch.Tensor, gallery: torch.Tensor, k: int):
    q, g, ieee = _triton_inputs(queries, gallery)
    M, N, K = q.shape[0], g.shape[0], q.shape[1]
    if not 0 < k <= N:
        raise ValueError(f"k must lie in [1, {N}] (gallery size), got {k}")
    v = torch.empty(M, k, device=q.device, dtype=torch.float32)
    i = torch.empty(M, k, device=q.device, dtype=torch.int64)
    if M:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)  # noqa: E731
        _topk_kernel[grid](q, g, v, i, M, N, K, q.stride(0), g.stride(0), k,
                           K_PAD=triton.next_power_of_2(max(k, 2)), IEEE=ieee)
    return _sort_lists(v, i)


def _ranks_one_way(q, g, p, ieee):
    M, N, K = q.shape[0], g.shape[0], q.shape[1]
    pos = torch.empty(M, device=q.device, dtype=torch.float32)
    out = torch.empty(M, device=q.device, dtype=torch.int64)
    if M == 0:
        return out, pos
    bm, bk = (16, 16) if INTERPRET else (32, 32)
    _positive_kernel[(triton.cdiv(M, bm),)](q, g, p, pos, M, K, q.stride(0), g.stride(0),
                                            IEEE=ieee, BLOCK_M=bm, BLOCK_K=bk)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)  # noqa: E731
    _rank_kernel[grid](q, g, pos, p, out, M, N, K, q.stride(0), g.stride(0), IEEE=ieee)
    return out, pos


def retrieval_ranks(image: torch.Tensor, text: torch.Tensor, caption_image=None):
    im, tx, ieee = _triton_inputs(image, text)
    n_img, n_txt = im.shape[0], tx.shape[0]
    ci = caption_image_rows(caption_image, n_img, n_txt, im.device)
    t2i, pos = _ranks_one_way(tx, im, ci.contiguous(), ieee)
    # best caption per image (highest positive score, smallest index on ties); images without a
    # caption get p = -1, pos = -inf, so every caption outranks them (rank N_txt, as `reference`)
    _, best = best_caption(pos, ci, n_img)
    i2t, _ = _ranks_one_way(im, tx, best.contiguous(), ieee)
    return i2t, t2i
