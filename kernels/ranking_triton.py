"""Similarity, streamed top-k and streamed retrieval ranks as Triton kernels, Liger-Kernel style:
``@triton.jit`` kernels and plain launchers (the conventions are in ranking.py). Autotuned block
sizes on the GPU (keyed by size classes), one fixed configuration under ``TRITON_INTERPRET=1``;
every grid is one-dimensional (a second grid axis stops at 65,535 blocks).

* top-k ranks (score, index) pairs as one int64 key each: the score's bits mapped to an order-
  preserving int32 in the high word, 2³¹−1 − index in the low word, so "larger key" is exactly
  "higher score, then smaller index" and one integer comparison resolves ties.
* retrieval ranks count both directions from one pass over the image × text tiles: each tile
  counts for its rows (image→text) and its columns (text→image). The positives are computed first,
  as the diagonal of tiles of the same shape and launch configuration (the same MMA instructions,
  so a positive is bit-identical to its entry in the counting tiles, even in bf16).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import INTERPRET, check_inputs, configs, dot_tile, size_class, splits, target_programs
from .ranking import best_caption, caption_image_rows, check_pair


def _gpu_configs(space: list[tuple]) -> list[triton.Config]:
    return [triton.Config(dict(zip(("BLOCK_M", "BLOCK_N", "BLOCK_K"), c[:3])), num_warps=c[3], num_stages=c[4])
            for c in space]


_GEMM_CONFIGS = configs(dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16), _gpu_configs(
    [(128, 128, 32, 8, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (64, 64, 64, 4, 3), (128, 128, 64, 8, 3)]))
_TOPK_CONFIGS = configs(dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16), _gpu_configs(
    [(64, 128, 32, 8, 3), (128, 64, 32, 8, 3)]))
#: the largest k the top-k kernel keeps in registers; beyond it, row chunks of the similarity
#: matrix are sorted (`_topk_chunked`)
TOPK_KERNEL_MAX_K = 128
#: registers per thread the top-k kernel's int64 keys (running list + tile) may take
TOPK_KEY_REGS = 128
#: scores in one row chunk of `_topk_chunked` (64 MiB in fp32)
CHUNK_ELEMS = 1 << 24
KEY_MIN = tl.constexpr(-(2**63))
KEY_MAX = tl.constexpr(2**63 - 1)
#: column tiles per program of the counting pass of retrieval ranks
RANK_TILES = 1 if INTERPRET else 16


def _fits_keys(configs, named_args, **kwargs):
    """The top-k configurations whose keys (BLOCK_M × (K_PAD + BLOCK_N) int64) fit TOPK_KEY_REGS."""
    return [c for c in configs if c.kwargs["BLOCK_M"] * (kwargs["K_PAD"] + c.kwargs["BLOCK_N"]) * 2
            <= TOPK_KEY_REGS * 32 * c.num_warps] or configs[-1:]


@triton.autotune(configs=_GEMM_CONFIGS, key=["M_class", "N_class", "K"])
@triton.jit
def _similarity_kernel(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_bn, stride_cm, M_class, N_class,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    n_m = tl.cdiv(M, BLOCK_M)
    n_n = tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    # groups of 8 row blocks walk the column blocks together: their B tiles are reused from L2
    pid_m, pid_n = tl.swizzle2d(pid // n_n, pid % n_n, n_m, n_n, 8)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = dot_tile(a_ptr, b_ptr, rows, cols, rows < M, cols < N, K, stride_am, stride_bn, BLOCK_M, BLOCK_N, BLOCK_K)
    tl.store(c_ptr + rows[:, None].to(tl.int64) * stride_cm + cols[None, :], acc,
             mask=(rows[:, None] < M) & (cols[None, :] < N))


@triton.jit
def _keys(s, cols):
    """The int64 keys of scores s [BM, BN] at gallery columns cols [BN] (see the module docstring);
    −0.0 counts as +0.0 and every NaN as the one NaN above +inf (torch.topk's order)."""
    s = tl.where(s == 0.0, 0.0, s)
    s = tl.where(s == s, s, float("nan"))
    bits = s.to(tl.int32, bitcast=True)
    mono = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (mono.to(tl.int64) << 32) | (2147483647 - cols).to(tl.int64)[None, :]


def _unpack(keys: torch.Tensor):
    """(scores fp32, indices int64) of top-k keys."""
    idx = 2147483647 - (keys & 0xFFFFFFFF)
    mono = (keys >> 32).to(torch.int32)
    return (mono ^ ((mono >> 31) & 0x7FFFFFFF)).view(torch.float32), idx


@triton.autotune(configs=_TOPK_CONFIGS, key=["M_class", "N_class", "K", "TOPK", "K_PAD"],
                 prune_configs_by={"early_config_prune": _fits_keys})
@triton.jit
def _topk_kernel(q_ptr, g_ptr, keys_ptr, M, N, K, stride_qm, stride_gn, cols_per_split, n_splits, TOPK,
                 M_class, N_class, K_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """Program (query block, gallery split): keys_ptr[rows, split, :K_PAD] = the keys of the TOPK
    best items of the split per row (KEY_MIN in unused slots), from a running list in registers.

    Per tile, entries at or below the row's current TOPK-th best are discarded first; then
    `rounds` = the most entries any row has left (≤ TOPK): each round moves every row's best
    remaining entry into the slot of its current minimum when it is larger."""
    pid = tl.program_id(0)
    split = pid % n_splits
    rows = (pid // n_splits) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    col_lo = split * cols_per_split
    col_hi = tl.minimum(N, col_lo + cols_per_split)
    slots = tl.arange(0, K_PAD)
    # distinct sentinels: slots < TOPK start below every real key, the others above (never evicted)
    slots64 = slots.to(tl.int64)
    sentinel = tl.where(slots < TOPK, KEY_MIN + slots64, KEY_MAX - slots64)
    run = sentinel[None, :] + tl.zeros((BLOCK_M, K_PAD), tl.int64)
    for n0 in range(col_lo, col_hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        cmask = cols < col_hi
        keys = _keys(dot_tile(q_ptr, g_ptr, rows, cols, rmask, cmask, K, stride_qm, stride_gn,
                              BLOCK_M, BLOCK_N, BLOCK_K), cols)
        low = tl.min(run, 1)
        above = cmask[None, :] & (keys > low[:, None])
        keys = tl.where(above, keys, KEY_MIN)
        rounds = tl.minimum(tl.max(tl.sum(above.to(tl.int32), 1), 0), TOPK)
        for _ in range(0, rounds):
            best = tl.max(keys, 1)
            low = tl.min(run, 1)
            run = tl.where((run == low[:, None]) & (best > low)[:, None], best[:, None], run)
            keys = tl.where(keys == best[:, None], KEY_MIN, keys)
    out = keys_ptr + rows[:, None].to(tl.int64) * (n_splits * K_PAD) + split * K_PAD + slots[None, :]
    tl.store(out, tl.where(run > KEY_MAX - K_PAD, KEY_MIN, run), mask=rmask[:, None])


@triton.jit
def _ranks_kernel(img_ptr, txt_ptr, ci_ptr, pos_ptr, best_ptr, best_pos_ptr, rank_i_ptr, rank_t_ptr,
                  n_img, n_txt, K, stride_i, stride_t, cols_per_prog, n_col_progs,
                  POSITIVES: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    """POSITIVES: pos[c] = image[ci[c]]·text[c], the diagonal of the tile (image rows ci[block] ×
    text block), one program per text block.

    Otherwise program (image block, text range), for its tiles S = image·textᵀ:
      rank_i[m] += #{c ≠ best[m]: S_mc > bp[m], or S_mc == bp[m] and c < best[m]}
      rank_t[c] += #{m ≠ ci[c]:   S_mc > pos[c], or S_mc == pos[c] and m < ci[c]}
    by atomic adds: integer counts, exact in any order (a per-(row block, text) partial buffer
    instead would hold N²/BLOCK counts: GBs at N = 200,000)."""
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    if POSITIVES:
        cols = pid * BLOCK + offs
        cmask = cols < n_txt
        img_rows = tl.load(ci_ptr + cols, mask=cmask, other=0)
        acc = dot_tile(img_ptr, txt_ptr, img_rows, cols, cmask, cmask, K, stride_i, stride_t, BLOCK, BLOCK, BLOCK_K)
        pos = tl.sum(tl.where(offs[:, None] == offs[None, :], acc, 0.0), 1)
        tl.store(pos_ptr + cols, pos, mask=cmask)
    else:
        prog = pid % n_col_progs
        rows = (pid // n_col_progs) * BLOCK + offs
        rmask = rows < n_img
        best = tl.load(best_ptr + rows, mask=rmask, other=-1)
        bp = tl.load(best_pos_ptr + rows, mask=rmask, other=float("inf"))
        col_lo = prog * cols_per_prog
        col_hi = tl.minimum(n_txt, col_lo + cols_per_prog)
        cnt = tl.zeros((BLOCK,), dtype=tl.int32)
        for n0 in range(col_lo, col_hi, BLOCK):
            cols = n0 + offs
            cmask = cols < col_hi
            ci = tl.load(ci_ptr + cols, mask=cmask, other=-1)
            pos = tl.load(pos_ptr + cols, mask=cmask, other=float("inf"))
            s = dot_tile(img_ptr, txt_ptr, rows, cols, rmask, cmask, K, stride_i, stride_t, BLOCK, BLOCK, BLOCK_K)
            valid = rmask[:, None] & cmask[None, :]
            c = cols[None, :]
            r = rows[:, None]
            hit_r = (c != best[:, None]) & ((s > bp[:, None]) | ((s == bp[:, None]) & (c < best[:, None])))
            hit_c = (r != ci[None, :]) & ((s > pos[None, :]) | ((s == pos[None, :]) & (r < ci[None, :])))
            cnt += tl.sum((valid & hit_r).to(tl.int32), 1)
            tl.atomic_add(rank_t_ptr + cols, tl.sum((valid & hit_c).to(tl.int32), 0), mask=cmask)
        tl.atomic_add(rank_i_ptr + rows, cnt, mask=rmask)


def _triton_inputs(a: torch.Tensor, b: torch.Tensor):
    """(a, b): checked, contiguous, one dtype (fp32 when they differ)."""
    check_pair(a, b)
    check_inputs({"a": a, "b": b})
    if a.dtype != b.dtype:
        a, b = a.float(), b.float()
    return a.contiguous(), b.contiguous()


def similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = _triton_inputs(a, b)
    M, N, K = a.shape[0], b.shape[0], a.shape[1]
    c = torch.empty(M, N, device=a.device, dtype=torch.float32)
    if M and N:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
        _similarity_kernel[grid](a, b, c, M, N, K, a.stride(0), b.stride(0), c.stride(0), size_class(M),
                                 size_class(N))
    return c


def _topk_chunked(q: torch.Tensor, g: torch.Tensor, k: int):
    """k > TOPK_KERNEL_MAX_K: row chunks of the similarity matrix (CHUNK_ELEMS scores each), each
    row stably sorted (score descending, index ascending among ties)."""
    M, N = q.shape[0], g.shape[0]
    rows = max(1, CHUNK_ELEMS // N)
    values = torch.empty(M, k, device=q.device, dtype=torch.float32)
    indices = torch.empty(M, k, device=q.device, dtype=torch.int64)
    for r0 in range(0, M, rows):
        v, i = torch.sort(similarity(q[r0:r0 + rows], g), dim=1, descending=True, stable=True)
        values[r0:r0 + rows], indices[r0:r0 + rows] = v[:, :k], i[:, :k]
    return values, indices


def topk(queries: torch.Tensor, gallery: torch.Tensor, k: int):
    q, g = _triton_inputs(queries, gallery)
    M, N, K = q.shape[0], g.shape[0], q.shape[1]
    if not 0 < k <= N:
        raise ValueError(f"k must lie in [1, {N}] (gallery size), got {k}")
    if k > TOPK_KERNEL_MAX_K:
        return _topk_chunked(q, g, k)
    k_pad = triton.next_power_of_2(max(k, 2))
    # few query blocks (64 rows, the configurations' BLOCK_M) → the gallery split across programs
    n_splits, cols_per = splits(N, triton.cdiv(M, 64), target_programs(q.device))
    keys = torch.empty(M, n_splits * k_pad, device=q.device, dtype=torch.int64)
    if M:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * n_splits,)  # noqa: E731
        _topk_kernel[grid](q, g, keys, M, N, K, q.stride(0), g.stride(0), cols_per, n_splits, k,
                           size_class(M), size_class(N), K_PAD=k_pad)
    # every split holds min(k, its size) real keys: the k largest over the splits are all real
    return _unpack(torch.topk(keys, k, dim=1, sorted=True).values)


def _rank_launch(n: int, dtype: torch.dtype) -> dict:
    """The one configuration of both ranks launches (positives and counts must share it)."""
    if INTERPRET:
        return dict(BLOCK=16, BLOCK_K=16, num_warps=1, num_stages=1)
    if n <= 4096 or dtype == torch.float32:  # fp32: tf32x3 holds each operand as two tf32 halves
        return dict(BLOCK=64, BLOCK_K=32 if dtype == torch.float32 else 64, num_warps=4, num_stages=3)
    return dict(BLOCK=128, BLOCK_K=64, num_warps=8, num_stages=3)


def retrieval_ranks(image: torch.Tensor, text: torch.Tensor, caption_image=None):
    im, tx = _triton_inputs(image, text)
    n_img, n_txt, K = im.shape[0], tx.shape[0], im.shape[1]
    dev = im.device
    ci = caption_image_rows(caption_image, n_img, n_txt, dev)
    launch = _rank_launch(max(n_img, n_txt), im.dtype)
    block = launch["BLOCK"]
    ci32 = ci.to(torch.int32).contiguous()
    pos = torch.empty(n_txt, device=dev, dtype=torch.float32)
    rank_i = torch.zeros(n_img, device=dev, dtype=torch.int32)
    rank_t = torch.zeros(n_txt, device=dev, dtype=torch.int32)
    if n_txt:
        _ranks_kernel[(triton.cdiv(n_txt, block),)](im, tx, ci32, pos, pos, pos, rank_i, rank_t, n_img, n_txt, K,
                                                    im.stride(0), tx.stride(0), 0, 1, POSITIVES=True, **launch)
    # best caption per image (highest positive score, smallest index on ties); images without a
    # caption get best = -1, bp = -inf, so every caption outranks them (rank N_txt, as `reference`)
    bp, best = best_caption(pos, ci, n_img)
    if n_img and n_txt:
        cols_per = RANK_TILES * block
        n_col_progs = triton.cdiv(n_txt, cols_per)
        _ranks_kernel[(triton.cdiv(n_img, block) * n_col_progs,)](
            im, tx, ci32, pos, best.to(torch.int32), bp.contiguous(), rank_i, rank_t, n_img, n_txt, K,
            im.stride(0), tx.stride(0), cols_per, n_col_progs, POSITIVES=False, **launch)
    return rank_i.long(), rank_t.long()
