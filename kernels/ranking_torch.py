"""Similarity, streamed top-k and streamed retrieval ranks in tiled torch: the CPU path (the
conventions are in ranking.py).

Tiles of at most block_q × block_g scores; on the CPU, blocks of query rows run concurrently on
worker threads (geomlab.runtime.map_threads), and `retrieval_ranks` counts each tile with a scan
in C (ranking_native.py) where a C compiler is at hand. On CPUs with bf16 dot-product
instructions both `topk` and `retrieval_ranks` compute their tiles with bf16 GEMMs (several times
the fp32 rate), and `retrieval_ranks` recounts tiles whose bf16 band is too wide from two int8
levels of each feature (exact integer GEMMs, `_int8_split`); both still return exact fp32
results: a rigorous bound on each tile's score error (`_bf16_error`, `_int8_error`) says which
entries the tile decides, and only the others are scored exactly.
"""
from __future__ import annotations

import functools
import threading
import time
from typing import NamedTuple

import torch

from geomlab.runtime import cpu_workers, map_threads

from . import ranking_native
from .ranking import best_caption, caption_image_rows, check_pair


def _as_f32(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous() if x.dtype == torch.float32 else x.float().contiguous()


#: query rows × gallery columns of one fp32 score tile of `topk`: 4096 × 4096 = 64 MiB per worker
#: thread, big enough for an efficient GEMM and few Python steps, small enough that N is bounded
#: by time, not memory.
TOPK_BLOCK_Q = 4096
TOPK_BLOCK_G = 4096
#: image rows × caption columns of one tile of `retrieval_ranks`: its counting pass then reads a
#: tile that stays in cache.
RANK_BLOCK_Q = 2048
RANK_BLOCK_G = 2048


def similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The full fp32 matrix a·bᵀ (the caller asked for it; fp32 accumulation)."""
    check_pair(a, b)
    return torch.mm(_as_f32(a), _as_f32(b).T)


def _tile(buf: torch.Tensor, m: int, n: int) -> torch.Tensor:
    """A contiguous m×n view at the start of a flat buffer."""
    return buf[: m * n].view(m, n)


def _merge(run_v, run_i, cand, k):
    """Merge candidate chunks [(rows, index, value), ...] into the running top-k lists of all m
    rows (run_v/run_i [m, w], w ≤ k, w = 0 at the start, each row sorted by (value desc, index asc)).

    Every chunk is in row-major order with ascending indices within a row, chunks in gallery order,
    and running entries have smaller indices than every candidate, so one stable descending sort of
    [running | candidates] per row orders ties by index."""
    rows = torch.cat([c[0] for c in cand]) if len(cand) > 1 else cand[0][0]
    idx = torch.cat([c[1] for c in cand]) if len(cand) > 1 else cand[0][1]
    val = torch.cat([c[2] for c in cand]) if len(cand) > 1 else cand[0][2]
    if len(cand) > 1:  # chunks are row-major each: a stable sort by row restores global row-major order
        order = torch.sort(rows, stable=True).indices
        rows, idx, val = rows[order], idx[order], val[order]
    m = run_v.shape[0]
    touched, counts = torch.unique_consecutive(rows, return_counts=True)
    slot = torch.repeat_interleave(torch.arange(touched.numel(), device=rows.device), counts)
    pos = torch.arange(rows.numel(), device=rows.device) - (torch.cumsum(counts, 0) - counts)[slot]
    w0 = run_v.shape[1]
    width = w0 + int(counts.max())
    cand_v = torch.full((touched.numel(), width), float("-inf"), device=val.device)
    cand_i = torch.full((touched.numel(), width), -1, dtype=torch.long, device=val.device)
    if w0:
        cand_v[:, :w0] = run_v[touched]
        cand_i[:, :w0] = run_i[touched]
    cand_v[slot, pos + w0] = val
    cand_i[slot, pos + w0] = idx
    v, order = torch.sort(cand_v, dim=1, descending=True, stable=True)
    kk = min(k, width)
    if kk > w0:  # the lists grow (only while fewer than k items have been seen: every row touched)
        assert touched.numel() == m
        return v[:, :kk].contiguous(), torch.gather(cand_i, 1, order[:, :kk])
    run_v[touched] = v[:, :kk]
    run_i[touched] = torch.gather(cand_i, 1, order[:, :kk])
    return run_v, run_i


#: width of the segments whose maxima prune `topk`'s selection (see `_above`): only the segments
#: that hold an entry above the threshold are read entry by entry.
SEGMENT = 64
#: 0/1 flags are counted in groups of COUNT_GROUP entries by a GEMM with a ones vector: exact in
#: bf16 (every group sum ≤ 256 is representable) and several times faster than torch's sum of a
#: bool or bf16 tensor. Rank tiles are padded to multiples of it with −inf, which never counts
#: (so that BAND_GROUP divides their sides).
COUNT_GROUP = 256


def _segment_max(s: torch.Tensor):
    """Maxima of the SEGMENT-wide column segments of s [m, n] (the ragged tail excluded), or None."""
    m, n = s.shape
    nf = n - n % SEGMENT
    return s[:, :nf].view(m, nf // SEGMENT, SEGMENT).amax(2) if nf else None


def _above(s: torch.Tensor, thr: torch.Tensor, segmax: torch.Tensor | None = None):
    """(rows, cols, values) of the entries of s [m, n] strictly above thr [m, 1], in row-major order.

    Two-level pruning: the maxima of SEGMENT-wide column segments (one fast reduction pass) are
    compared with the threshold, and only the few segments whose maximum beats it are read entry
    by entry. (A bool mask of the whole tile + nonzero costs several times more.)"""
    m, n = s.shape
    nf = n - n % SEGMENT
    out = []
    if nf:
        nb = nf // SEGMENT
        segs = s[:, :nf].view(m, nb, SEGMENT)
        r, b = ((segs.amax(2) if segmax is None else segmax) > thr).nonzero(as_tuple=True)
        if r.numel():
            seg = segs.reshape(m * nb, SEGMENT).index_select(0, r * nb + b) if nf == n else segs[r, b]
            flat = (seg > thr.index_select(0, r)).view(-1).nonzero().squeeze(1)
            which = flat // SEGMENT
            out.append((r.index_select(0, which), b.index_select(0, which) * SEGMENT + flat % SEGMENT,
                        seg.view(-1).index_select(0, flat)))
    if nf < n:
        tail = s[:, nf:]
        r2, c2 = (tail > thr).nonzero(as_tuple=True)
        if r2.numel():
            out.append((r2, c2 + nf, tail[r2, c2]))
    if not out:
        e = torch.empty(0, dtype=torch.long, device=s.device)
        return e, e, torch.empty(0, device=s.device)
    if len(out) == 1:
        return out[0]
    rows, cols, vals = (torch.cat(x) for x in zip(*out))
    order = torch.sort(rows * n + cols).indices
    return rows[order], cols[order], vals[order]


def _above_bf16(s: torch.Tensor, thr: torch.Tensor, flags: torch.Tensor):
    """`_above` for a bf16 tile s [m, n] (n a multiple of COUNT_GROUP) and a threshold exact in
    bf16, with fp32 values; `flags` is a bf16 buffer of s's size. bf16 reductions are slow, so the
    pruning differs: the entries' 0/1 flags, summed per COUNT_GROUP-wide group by a GEMM with a
    ones vector, find the groups holding an entry above thr; in those, the flags read as int64
    words (four to a word) find the entries with one nonzero over 4× fewer elements."""
    m, n = s.shape
    f = torch.gt(s, thr.bfloat16(), out=_tile(flags, m, n)).view(-1, COUNT_GROUP)
    ones = torch.ones(COUNT_GROUP, 1, dtype=s.dtype, device=s.device)
    hit = torch.mm(f, ones).view(-1).nonzero().squeeze(1)
    words_per_group = COUNT_GROUP // 4
    w = f.index_select(0, hit).view(torch.int64).view(-1).nonzero().squeeze(1)
    word = hit.index_select(0, w // words_per_group) * words_per_group + w % words_per_group
    flat = (4 * word.unsqueeze(1) + torch.arange(4, device=s.device)).view(-1)
    flat = flat.index_select(0, f.view(-1).index_select(0, flat).nonzero().squeeze(1))
    return flat // n, flat % n, s.view(-1).index_select(0, flat).float()


def _workers(device, n_blocks: int) -> int:
    """Worker threads for the CPU paths: one per block, at most the cores this process may use and
    torch's thread budget (1 off the CPU; see `map_threads` for why threads, not intra-op threads)."""
    if device.type != "cpu" or n_blocks < 2:
        return 1
    return cpu_workers(limit=min(n_blocks, torch.get_num_threads()))


def _block_size(n: int, block: int, workers: int) -> int:
    """A block size ≤ `block` that splits n rows into a multiple of `workers` blocks (balance)."""
    if workers <= 1:
        return max(1, min(block, n))
    nb = -(-n // block)
    nb = -(-nb // workers) * workers
    return max(1, -(-n // nb))


def _topk_rows(qb: torch.Tensor, g: torch.Tensor, k: int, bg: int, buf: torch.Tensor,
               buf16: torch.Tensor | None = None, flags: torch.Tensor | None = None):
    """Streamed top-k of the query rows qb against every gallery tile. With bf16 qb and g, each
    tile's GEMM runs in bf16 into `buf16`; warm-up tiles are widened into `buf` (their selection
    uses fp32 segment maxima), the others are pruned in bf16 against the running k-th value (exact
    in bf16: every listed value is a bf16 score) with the flag buffer `flags`."""
    m, ng, dev = qb.shape[0], g.shape[0], qb.device
    # running lists [m, w ≤ k], sorted (score desc, index asc); candidates wait in `pending`
    # and are merged in batches, so most tiles cost one GEMM and one pruning pass.
    run_v = torch.empty(m, 0, device=dev)
    run_i = torch.empty(m, 0, dtype=torch.long, device=dev)
    pending, n_pending = [], 0
    for g0 in range(0, ng, bg):
        g1 = min(ng, g0 + bg)
        n = g1 - g0
        s = torch.mm(qb, g[g0:g1].T, out=_tile(buf if buf16 is None else buf16, m, n))
        w = run_v.shape[1]
        if w < k:  # warm-up: the lists are not full yet
            s = _tile(buf, m, n).copy_(s) if buf16 is not None else s
            if pending:
                run_v, run_i = _merge(run_v, run_i, pending, k)
                pending, n_pending, w = [], 0, run_v.shape[1]
            need = k - w
            if n <= need:  # every entry is a candidate
                rows, cols = torch.ones_like(s, dtype=torch.bool).nonzero(as_tuple=True)
                vals = s[rows, cols]
            else:  # everything ≥ a lower bound of the tile's need-th value (so all ties at the
                # boundary too), or above the current last entry. The bound: the need-th largest
                # segment maximum (need distinct entries reach it) — a top-k over 64× fewer values.
                segmax = _segment_max(s)
                if segmax is not None and segmax.shape[1] >= need:
                    kth = torch.topk(segmax, need, dim=1, sorted=False).values.amin(1, keepdim=True)
                else:
                    kth = torch.topk(s, need, dim=1, sorted=False).values.amin(1, keepdim=True)
                thr = torch.nextafter(kth, torch.full_like(kth, float("-inf")))
                if w:
                    thr = torch.minimum(thr, run_v[:, -1:])
                rows, cols, vals = _above(s, thr, segmax)
            run_v, run_i = _merge(run_v, run_i, [(rows, cols + g0, vals)], k)
            continue
        if buf16 is None:
            rows, cols, vals = _above(s, run_v[:, -1:])
        elif n % COUNT_GROUP:  # a ragged last tile: widened
            rows, cols, vals = _above(_tile(buf, m, n).copy_(s), run_v[:, -1:])
        else:
            rows, cols, vals = _above_bf16(s, run_v[:, -1:], flags)
        if rows.numel():
            pending.append((rows, cols + g0, vals))
            n_pending += rows.numel()
        if n_pending > m * k // 4:  # tighten the threshold
            run_v, run_i = _merge(run_v, run_i, pending, k)
            pending, n_pending = [], 0
    if pending:
        run_v, run_i = _merge(run_v, run_i, pending, k)
    return run_v, run_i


#: extra candidates per query kept by the bf16 pass of `topk` (then rescored exactly).
APPROX_EXTRA = 16
#: gallery size from which `topk` takes the bf16 pass by itself (where bf16 GEMMs are fast).
APPROX_MIN_GALLERY = 16384


def _fast_bf16_gemm(device) -> bool:
    """True on CPUs with bf16 dot-product instructions (AVX512-BF16 / AMX), where a bf16 GEMM with
    fp32 accumulation runs several times as fast as an fp32 one."""
    if device.type != "cpu":
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read(1 << 16)
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def _fp32_error(norm, other_norm, d: int):
    """Bound on |fp32 GEMM score − exact score rounded to fp32| for rows of norm ‖a‖ against rows
    of norm ≤ other_norm: fp32 accumulation of d products plus that final rounding, ≤ (d + 1)·2⁻²⁴
    ‖a‖‖b‖; (d + 2)·2⁻²³ leaves a factor 2 for the norms' own rounding and any library's order."""
    return (d + 2) * 2.0 ** -23 * norm * other_norm


def _bf16_error(norm, res, other_norm, other_res, d: int):
    """Bound on |bf16 GEMM accumulator − exact score| for rows of norm ‖a‖ and bf16 residual
    ‖a − â‖ against rows of norm ≤ other_norm and residual ≤ other_res: the input roundings,
    |â·b̂ − a·b| ≤ ‖â‖‖δb‖ + ‖δa‖‖b‖, plus `_fp32_error`. The accumulator's own rounding to bf16
    (≤ 2⁻⁸ of its magnitude, to nearest) is the caller's to add, at the score it compares."""
    return (1 + 2.0 ** -7) * (norm * other_res + res * other_norm) + _fp32_error(norm, other_norm, d)


def _bf16_residuals(x: torch.Tensor, chunk: int = 65536):
    """(bf16 copy of x, ‖x_i − bf16(x_i)‖ per row), without an N×d fp32 temporary."""
    xb = x.bfloat16()
    res = torch.empty(x.shape[0], device=x.device)
    for i0 in range(0, x.shape[0], chunk):
        res[i0:i0 + chunk] = (x[i0:i0 + chunk] - xb[i0:i0 + chunk].float()).norm(dim=1)
    return xb, res


def _rescore(q: torch.Tensor, g: torch.Tensor, idx: torch.Tensor, k: int, chunk: int = 256):
    """Exact fp32 scores of the candidates idx [m, c], sorted (score desc, index asc): top k."""
    idx = idx.sort(dim=1).values  # ascending index first: the stable sort below then breaks ties by index
    m, c = idx.shape
    scores = torch.empty(idx.shape, device=q.device)
    for r0 in range(0, m, chunk):
        r1 = min(m, r0 + chunk)
        cand = g.index_select(0, idx[r0:r1].reshape(-1)).view(r1 - r0, c, -1)
        scores[r0:r1] = cand.mul_(q[r0:r1].unsqueeze(1)).sum(2)
    v, order = scores.sort(dim=1, descending=True, stable=True)
    return v[:, :k], torch.gather(idx, 1, order[:, :k])


def topk(queries: torch.Tensor, gallery: torch.Tensor, k: int, *, block_q: int | None = None,
         block_g: int | None = None, approx: bool | None = None, stats: dict | None = None):
    """(values [Nq, k] fp32, indices [Nq, k] int64) of the k highest scores q·g per query, streamed
    over gallery tiles: per tile one GEMM into a reusable buffer, then only the entries above the
    running k-th value of their row are selected (threshold pruning) and merged. Never more than
    one block_q × block_g tile of scores per worker thread exists.

    `approx` (default: fp32 inputs, a large gallery and a CPU with fast bf16 GEMMs) first finds
    k + APPROX_EXTRA candidates per query with bf16 GEMMs, then rescores them in fp32. The result
    is still exact: a query is accepted only if its exact k-th score beats the last candidate's
    bf16 score by more than the bf16 error bound (so no other item can reach it); the few queries
    that fail this test are recomputed with the fp32 pass. `stats`, if given, receives "recomputed"
    (the number of those queries)."""
    check_pair(queries, gallery)
    nq, ng = queries.shape[0], gallery.shape[0]
    if not 0 < k <= ng:
        raise ValueError(f"k must lie in [1, {ng}] (gallery size), got {k}")
    dev = queries.device
    if approx is None:
        approx = (queries.dtype == gallery.dtype == torch.float32 and ng >= APPROX_MIN_GALLERY
                  and _fast_bf16_gemm(dev))
    approx = approx and k + APPROX_EXTRA < ng
    bq0 = min(block_q or TOPK_BLOCK_Q, max(nq, 1))
    workers = _workers(dev, nq // 256)  # ≥ 256 query rows per worker
    bq = _block_size(nq, bq0, workers)
    bg = min(block_g or TOPK_BLOCK_G, ng)
    q, g = _as_f32(queries), _as_f32(gallery)
    if approx:
        qa, q_res = _bf16_residuals(q)
        ga, g_res = _bf16_residuals(g)
        error = _bf16_error(q.norm(dim=1), q_res, g.norm(dim=1).max(), g_res.max(), q.shape[1])
    out_v = torch.empty(nq, k, device=dev)
    out_i = torch.empty(nq, k, dtype=torch.long, device=dev)
    local = threading.local()

    def exact(rows):
        if not hasattr(local, "buf"):
            local.buf = torch.empty(bq * bg, device=dev)
        return _topk_rows(rows, g, k, bg, local.buf)

    def block(q0):
        q1 = min(nq, q0 + bq)
        if not approx:
            out_v[q0:q1], out_i[q0:q1] = exact(q[q0:q1])
            return 0
        if not hasattr(local, "buf16"):
            local.buf16 = torch.empty(bq * bg, device=dev, dtype=torch.bfloat16)
            local.flags = torch.empty(bq * bg, device=dev, dtype=torch.bfloat16)
            local.buf = torch.empty(bq * bg, device=dev)
        cand_v, cand_i = _topk_rows(qa[q0:q1], ga, k + APPROX_EXTRA, bg, local.buf, local.buf16, local.flags)
        v, i = _rescore(q[q0:q1], g, cand_i, k)
        # any other item has a bf16 score ≤ the last candidate's, so an exact score ≤ that + bound
        last = cand_v[:, -1]
        bound = (1 + 2.0 ** -5) * (error[q0:q1] + 2.0 ** -8 * last.abs())
        bad = (v[:, -1] <= last + bound).nonzero().squeeze(1)
        if bad.numel():  # rare: those queries are recomputed exactly, together
            v[bad], i[bad] = exact(q[q0:q1].index_select(0, bad))
        out_v[q0:q1], out_i[q0:q1] = v, i
        return bad.numel()

    recomputed = map_threads(block, range(0, nq, bq), workers)
    if stats is not None:
        stats["recomputed"] = sum(recomputed) if approx else 0
    return out_v, out_i


#: this machine's costs (the idle 2-core AMD EPYC with bf16 and int8 dot-product instructions,
#: the C tile scan, N = 50,000, d = 256: each kind of benchmark data counted with bf16 tiles
#: throughout and with int8 tiles throughout): what deciding one band entry of a bf16 tile adds
#: (its fp32 step in the scan, and exact scores where that leaves it undecided), and what an int8
#: tile costs beyond a bf16 tile with an empty band, per tile entry. In nanoseconds of wall time
#: on both cores.
RESOLVE_NS_PER_ENTRY = 22.0
RECOUNT_NS_PER_ENTRY = 0.86
#: a bf16 rank tile one of whose directions holds more ambiguous entries than this fraction of it
#: is recounted from int8 levels, and so is the rest of its row block: past it (both directions
#: hold about as many) deciding the band costs more than the int8 tile (the case of unrelated
#: features, about 3.8% of each direction at d = 256; at median rank 1% of N it holds 1.1%). The
#: C scan stops counting a tile as soon as a direction's band passes it.
RESOLVE_MAX_FRACTION = RECOUNT_NS_PER_ENTRY / (2 * RESOLVE_NS_PER_ENTRY)
#: entries per group of a rank tile's line (`_band_masks`): one bit each in the group's band mask.
#: Smaller groups leave fewer empty bits to decode around each band entry, larger ones fewer masks
#: to search (8 measured fastest of 8, 16, 32 and 64 at median ranks 30 and 1% of N, compiled by
#: torch.compile in an earlier release).
BAND_GROUP = 8
#: smallest number of images and of captions for which `retrieval_ranks` takes bf16 tiles by itself.
RANK_APPROX_MIN = 4096
#: the phases of a rank tile whose time `retrieval_ranks` reports in stats["seconds"]: its GEMM,
#: its counting (with the C scan: the fp32 step of its band entries included), the scoring of its
#: band entries (with the C scan: the exact scores only), and the whole count of a tile recounted
#: from int8 levels after its bf16 band held too many entries (int8 GEMMs, their widening to fp32
#: scores, counting).
PHASES = ("gemm", "count", "resolve", "recount")
#: the per-block counters of `retrieval_ranks`' stats (with PHASES).
TALLIES = ("fp32_tiles", "bf16_tiles", "int8_tiles", "band_i2t", "band_t2i", "resolved_i2t", "resolved_t2i")
#: the fine level's steps per coarse step of `_int8_split`: x ≈ scale·(q₁ + q₂/INT8_SPLIT), both
#: levels in [−127, 127] (the coarse level's rounding error, at most half a step, times 254).
INT8_SPLIT = 254


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _exact_scores(a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """a[rows[k]]·b[cols[k]] for every k, computed in fp64 and rounded once to fp32: the scores that
    decide every rank (a row-wise reduction, so identical vectors always score identically within
    one call), where the C kernels are not at hand (`ranking_native.exact_scores` otherwise)."""
    return (a[rows].double() * b[cols].double()).sum(1).float()


def _exact_dots(a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                chunk: int = 8192) -> torch.Tensor:
    """`_exact_scores` in chunks of pairs (bounded fp64 temporaries)."""
    out = torch.empty(rows.numel(), device=a.device)
    for k0 in range(0, rows.numel(), chunk):
        k1 = min(rows.numel(), k0 + chunk)
        out[k0:k1] = _exact_scores(a, b, rows[k0:k1], cols[k0:k1])
    return out


class Int8Split(NamedTuple):
    """Every row x of a feature matrix as two int8 levels, x̃ = scale·(q₁ + q₂/INT8_SPLIT), and what
    bounds the error of scoring with them (docs/definitions.md, "int8 tiles"). `levels` [N, 2d]
    holds q₁ | q₂ on the image side and q₂ | q₁ on the caption side: then one int8 GEMM of the first
    d image columns with the last d caption columns gives q₁·p₁, and one over all 2d columns
    q₁·p₂ + q₂·p₁ (`_int8_tile`). Per row, fp32: `scale`; `step`, scale/INT8_SPLIT rounded;
    `residual` ≥ ‖x − x̃‖; `size` ≥ scale·(‖q₁‖ + ‖q₂‖/INT8_SPLIT) ≥ ‖x̃‖; `fine` ≥
    scale·‖q₂‖/INT8_SPLIT."""
    levels: torch.Tensor
    scale: torch.Tensor
    step: torch.Tensor
    residual: torch.Tensor
    size: torch.Tensor
    fine: torch.Tensor


def _round_toward(x: torch.Tensor, dtype, up: bool) -> torch.Tensor:
    """x rounded to dtype towards +inf (up) or −inf: never below (above) x."""
    t = x.to(dtype)
    wrong = t.double() < x.double() if up else t.double() > x.double()
    return torch.where(wrong, torch.nextafter(t, torch.full_like(t, float("inf") if up else float("-inf"))), t)


def _up(x64: torch.Tensor) -> torch.Tensor:
    """x (fp64, ≥ 0) rounded up to fp32, with a relative margin 2⁻²⁰ for its own fp64 rounding."""
    return _round_toward(x64 * (1 + 2.0 ** -20), torch.float32, up=True)


def _int8_split(x: torch.Tensor, caption_side: bool, chunk: int = 8192) -> Int8Split:
    """The Int8Split of x [N, d] (fp32), in chunks of rows (no N × d fp64 temporary)."""
    n, d = x.shape
    levels = torch.empty(n, 2 * d, dtype=torch.int8, device=x.device)
    scale, residual, size, fine = (torch.empty(n, device=x.device) for _ in range(4))
    for i0 in range(0, n, chunk):
        xc = x[i0:i0 + chunk].double()
        s = (xc.abs().amax(1) / 127).float()
        s = torch.where(s > 0, s, torch.ones_like(s))  # a zero row: any scale represents it
        y = xc / s.double().unsqueeze(1)
        q1 = y.round().clamp_(-127, 127)
        q2 = ((y - q1) * INT8_SPLIT).round_().clamp_(-127, 127)
        i1 = i0 + xc.shape[0]
        levels[i0:i1, :d] = (q2 if caption_side else q1).to(torch.int8)
        levels[i0:i1, d:] = (q1 if caption_side else q2).to(torch.int8)
        s64 = s.double()
        e = (xc - s64.unsqueeze(1) * (q1 + q2 / INT8_SPLIT)).norm(dim=1)
        scale[i0:i1] = s
        residual[i0:i1] = _up(e + 2.0 ** -40 * xc.norm(dim=1))  # (+ the fp64 rounding of x − x̃)
        size[i0:i1] = _up(s64 * (q1.norm(dim=1) + q2.norm(dim=1) / INT8_SPLIT))
        fine[i0:i1] = _up(s64 * q2.norm(dim=1) / INT8_SPLIT)
    return Int8Split(levels, scale, (scale / INT8_SPLIT).float(), residual, size, fine)


def _int8_error(mine: Int8Split, norm: torch.Tensor, other: Int8Split, other_norm: torch.Tensor):
    """Bound (fp64) on |int8 tile score − exact score| for each row of `mine` (norms ‖a‖) against
    every row of `other` (norms ‖b‖), from the largest of the other side's quantities:
    a·b − ã·b̃ = (a − ã)·b + ã·(b − b̃) gives ‖a − ã‖‖b‖ + ‖ã‖‖b − b̃‖; the GEMMs leave out the fine
    levels' product, |scale_a·scale_b·q₂·p₂|/254² ≤ fine_a·fine_b; and the tile's fp32 evaluation
    (`_widen`: at most 8 roundings) errs by at most 2⁻²¹·size_a·size_b."""
    b_norm, b_res, b_size, b_fine = (t.max().double() for t in (other_norm, other.residual, other.size, other.fine))
    a_size = mine.size.double()
    return (mine.residual.double() * b_norm + a_size * b_res + mine.fine.double() * b_fine
            + 2.0 ** -21 * a_size * b_size)


def _bands(pos: torch.Tensor, w: torch.Tensor, dtype):
    """(lo, hi) in the tile dtype, per positive score `pos` of a line and half-width w (fp64, the
    tile's error bound): a tile entry above hi surely has an exact score (rounded to fp32) above
    pos, one below lo surely below; entries in [lo, hi] are decided by their exact score. Lines
    without a positive (pos = −inf) get +inf: they count nothing. 2⁻²²|pos| more covers the exact
    score's rounding to fp32 (at most half an ulp of it); lo and hi are rounded outwards."""
    w = (1 + 2.0 ** -10) * w + 2.0 ** -22 * pos.double().abs()
    lo, hi = pos.double() - w, pos.double() + w
    for t in (torch.float32, dtype):  # (bf16 through fp32: every bf16 number is an fp32 one)
        lo, hi = _round_toward(lo, t, up=False), _round_toward(hi, t, up=True)
    has = pos > float("-inf")
    lo, hi = torch.where(has, lo, float("inf")), torch.where(has, hi, float("inf"))
    # padded with COUNT_GROUP entries, so that a padded tile's slice always exists
    pad = torch.full((COUNT_GROUP,), float("inf"), device=pos.device, dtype=dtype)
    return torch.cat([lo, pad]), torch.cat([hi, pad])


def _bf16_width(pos, norm, res, other_norm, other_res, d: int) -> torch.Tensor:
    """Half-width (fp64) of a bf16 tile's band around each positive score `pos` of a row (norm ‖a‖,
    bf16 residual ‖a − â‖) against the other side (norms, residuals; their largest stand in):
    `_bf16_error` plus the accumulator's rounding to bf16 (≤ 2⁻⁸|s|, |s| ≤ |pos| + w), with a
    margin 2⁻⁵ for the latter's own bound."""
    error = _bf16_error(norm.double(), res.double(), other_norm.max().double(), other_res.max().double(), d)
    return (1 + 2.0 ** -5) * (error + 2.0 ** -8 * pos.double().abs())


def _widen(g1: torch.Tensor, g2: torch.Tensor, row_scale: torch.Tensor, col_step: torch.Tensor,
           out: torch.Tensor) -> None:
    """out = the fp32 scores of an int8 tile: (254·q₁·p₁ + (q₁·p₂ + q₂·p₁))·scale_a·step_b, from
    the two int32 GEMM tiles g1 and g2 (`_int8_tile`)."""
    out.copy_((g1.float() * INT8_SPLIT + g2.float()) * row_scale.unsqueeze(1) * col_step.unsqueeze(0))


def _int8_tile(a: Int8Split, b: Int8Split, rows: slice, cols: slice, g1, g2, out, widen) -> None:
    """The fp32 scores of image rows `rows` against caption rows `cols` into out [m, n], from two
    exact int8 GEMMs into the int32 buffers g1, g2 (contiguous, [m, n])."""
    d = a.levels.shape[1] // 2
    torch._int_mm(a.levels[rows, :d], b.levels[cols, d:].T, out=g1)  # q₁·p₁
    torch._int_mm(a.levels[rows], b.levels[cols].T, out=g2)  # q₁·p₂ + q₂·p₁
    widen(g1, g2, a.scale[rows], b.step[cols], out)


def _band_masks(s: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, dim: int):
    """(#entries > hi, band mask), int32, per group of BAND_GROUP entries of each line of the padded
    tile s [mp, np] along dim; bit k of a group's band mask is set where its entry k lies in
    [lo, hi]. Rows (dim=1, against lo, hi [mp, 1]): [mp, np/BAND_GROUP], group g of a row holding
    its columns g, g + G, g + 2G, … (G = np/BAND_GROUP). Columns (dim=0, against lo, hi [1, np]):
    [mp/BAND_GROUP, np], group g of a column holding its rows g·BAND_GROUP + k. Either way the
    sums run across the rows of a [BAND_GROUP, ·] view, many contiguous lanes at a time. The
    counting of `retrieval_ranks` where its C scan is not at hand (no C compiler, or CUDA tensors
    on the torch backend)."""
    mp, np_ = s.shape
    if dim == 1:
        v, lo, hi = s.view(mp, BAND_GROUP, np_ // BAND_GROUP), lo.unsqueeze(2), hi.unsqueeze(2)
    else:
        v, lo, hi = s.view(mp // BAND_GROUP, BAND_GROUP, np_), lo.unsqueeze(0), hi.unsqueeze(0)
    bit = torch.arange(BAND_GROUP, device=s.device, dtype=torch.int32).view(1, BAND_GROUP, 1)
    in_band = ((v >= lo) & (v <= hi)).to(torch.int32)
    return (v > hi).sum(1, dtype=torch.int32), (in_band << bit).sum(1, dtype=torch.int32)


def _fp32_step(a, b, rows, cols, pos, norm_a, norm_b, chunk: int = 8192):
    """(won, undecided), bool per pair k: the pairs (a[rows[k]], b[cols[k]]) scored in fp32, f (any
    summation order: within `_fp32_error` of the exact score rounded to fp32, like an fp32 GEMM's),
    against the positive's score pos[k]: won where f − error > pos (the exact score rounded to
    fp32 is above pos), undecided where neither that nor f + error < pos holds. In chunks of
    pairs (bounded temporaries)."""
    won = torch.empty(rows.numel(), dtype=torch.bool, device=a.device)
    undecided = torch.empty_like(won)
    for k0 in range(0, rows.numel(), chunk):
        r, c, p = rows[k0:k0 + chunk], cols[k0:k0 + chunk], pos[k0:k0 + chunk]
        f = (a[r] * b[c]).sum(1)
        err = _fp32_error(norm_a[r], norm_b[c], a.shape[1])
        won[k0:k0 + chunk] = f - err > p
        undecided[k0:k0 + chunk] = (f + err >= p) & ~won[k0:k0 + chunk]
    return won, undecided


def _direction(s, lo, hi, own, dim: int, max_band: float):
    """One direction of the padded rank tile s [mp, np] (−inf padding): dim=1 its rows against
    lo, hi [mp, 1], dim=0 its columns against lo, hi [1, np]; own [m] or [n]: 1 where the line's
    positive lies in the tile. Returns (per line: #entries > hi, int64 [mp] or [np]; the band
    entries (rows, cols) in [lo, hi] in tile coordinates, the positives' included), or None when
    the band holds more than max_band entries besides the positives.

    `_band_masks` reads the tile once; the band entries are then decoded from the few groups whose
    band mask is not 0, without reading the tile again."""
    above, mask = _band_masks(s, lo, hi, dim)
    # the masks read two to a word first: the search runs over half the elements
    words = mask.view(-1, 2)
    hit_word = words.view(torch.int64).view(-1).nonzero().squeeze(1)
    w, byte = words.index_select(0, hit_word).nonzero(as_tuple=True)
    hit = hit_word.index_select(0, w) * 2 + byte
    bit = torch.arange(BAND_GROUP, device=s.device, dtype=torch.int32)
    k, j = ((mask.view(-1).index_select(0, hit).unsqueeze(1) >> bit) & 1).nonzero(as_tuple=True)
    if k.numel() - float(own.sum()) > max_band:
        return None
    hit = hit.index_select(0, k)
    mp, np_ = s.shape
    if dim == 1:
        groups = np_ // BAND_GROUP
        return above.sum(1), (hit // groups, hit % groups + j * groups)
    return above.sum(0), ((hit // np_) * BAND_GROUP + j, hit % np_)


def _beats(im, tx, img, txt, pos, gallery, own, step=None, exact_dots=_exact_dots):
    """(1 per pair (img[k], txt[k]) whose exact score beats the positive's (score pos[k], gallery
    index own[k]) as gallery item gallery[k] — higher, or equal with a smaller index — else 0;
    the number of pairs other than the positives themselves, which never count; the number of
    those scored exactly).

    With `step` (`_fp32_step` with the rows' norms) the pairs are first scored in
    fp32, which decides every pair whose fp32 score is more than `_fp32_error` away from pos; only
    the others, the positives among them, are scored exactly (`exact_dots`: the function that
    scored the positives). Worth it where the band is wider than that error (bf16 and int8
    tiles)."""
    def wins(f, pos, gallery, own):  # exact score f beats the positive's: higher, or tied at a smaller index
        return (f > pos) | ((f == pos) & (gallery < own))

    positives = int((gallery == own).sum())
    if step is None:  # every pair scored exactly
        won = wins(exact_dots(im, tx, img, txt), pos, gallery, own)
        return won.long(), img.numel() - positives, img.numel() - positives
    won, undecided = step(im, tx, img, txt, pos)
    exact = undecided.nonzero().squeeze(1)
    f = exact_dots(im, tx, img.index_select(0, exact), txt.index_select(0, exact))
    pos, gallery_x, own_x = (x.index_select(0, exact) for x in (pos, gallery, own))
    won[exact] = wins(f, pos, gallery_x, own_x)
    return won.long(), img.numel() - positives, exact.numel() - int((gallery_x == own_x).sum())


#: at most this many image × caption pairs (and no tile size, `approx` or `stats` asked for), every
#: score is computed exactly and the ranks counted directly: below it the tiles' setup costs more than
#: the arithmetic (a fine trace's 24 × 24 pairs: about 0.5 ms against 4 ms tiled, one thread).
RANK_DENSE_MAX_PAIRS = 4096


def _dense_ranks(im, tx, ci, pos_t, pos_i, best):
    """retrieval_ranks of a small problem from every exact score (`_exact_dots`, as the tiled path
    scores its band entries): the same ranks, ties to the smaller index."""
    n_img, n_txt, dev = im.shape[0], tx.shape[0], im.device
    i, j = torch.arange(n_img, device=dev), torch.arange(n_txt, device=dev)
    s = _exact_dots(im, tx, i.repeat_interleave(n_txt), j.repeat(n_img)).view(n_img, n_txt)
    above_i = (s > pos_i[:, None]) | ((s == pos_i[:, None]) & (j[None, :] < best[:, None]))
    above_t = (s > pos_t[None, :]) | ((s == pos_t[None, :]) & (i[:, None] < ci[None, :]))
    return torch.where(best < 0, n_txt, above_i.sum(1)), above_t.sum(0)


def retrieval_ranks(image: torch.Tensor, text: torch.Tensor, caption_image=None, *,
                    block_q: int | None = None, block_g: int | None = None, approx: bool | None = None,
                    stats: dict | None = None):
    """(image→text ranks [N_img], text→image ranks [N_txt]), int64, streamed: one pass over
    image-block × caption-block tiles counts both directions (rows for image→text, columns for
    text→image); memory beyond the inputs is a few tiles per worker plus O(N) vectors (and bf16
    copies and int8 levels of the inputs with `approx`).

    Every rank is decided by exact scores (`_exact_scores`): the positives' first (O(N·d)), then each
    tile sorts its entries, per row against the row's positive and per column against the column's,
    into surely above, surely below and a narrow band around the positive (`_bands`); only band
    entries other than the positive itself are scored again: in fp32 first where the tile was not
    fp32, exactly where that leaves them undecided. On the CPU one pass of a C scan does all but
    the exact scores (`ranking_native.scan_tile`); elsewhere, or without a C compiler, one torch
    pass per direction (`_direction`) and `_beats`.

    `approx` (default: a CPU with fast bf16 GEMMs and at least RANK_APPROX_MIN images and
    captions) computes the tiles with bf16 GEMMs, whose band is wide (about ±4·10⁻³ for unit
    features); a tile whose band holds too many entries (RESOLVE_MAX_FRACTION) is recounted from
    two int8 levels of each feature (`_int8_split`: exact integer GEMMs, a band about 40× narrower,
    about twice the bf16 tile's cost), as are the rest of its row block. Either way the ranks are
    those of the exact scores. `stats`, if given, receives "tiles", "fp32_tiles", "bf16_tiles" and
    "int8_tiles" (the tiles counted at each precision), "band_i2t" and "band_t2i" (band entries
    scored again per direction, the positives' own excluded), "resolved_i2t", "resolved_t2i" and
    their sum "resolved" (those scored exactly), and "seconds": thread-seconds (summed over the
    worker threads) of each of PHASES, and "setup"
    (the positives' exact scores, norms, bf16 copies and bands, before the tiles; the int8 levels
    are made when a first tile is recounted, in its "recount" time)."""
    check_pair(image, text)
    n_img, n_txt = image.shape[0], text.shape[0]
    dev, d = image.device, image.shape[1]
    ci = caption_image_rows(caption_image, n_img, n_txt, dev)
    im, tx = _as_f32(image), _as_f32(text)
    if approx is None:
        approx = _fast_bf16_gemm(dev) and min(n_img, n_txt) >= RANK_APPROX_MIN
    if approx and dev.type != "cpu":
        raise ValueError(f"retrieval_ranks: approx=True (bf16 and int8 tiles) runs on the CPU only, got {dev}")
    t_setup = time.perf_counter()
    native = ranking_native.native_kernels() if dev.type == "cpu" else None
    if native:
        exact_dots = functools.partial(ranking_native.exact_scores, native)
        widen = functools.partial(ranking_native.widen, native, float(INT8_SPLIT))
    else:
        exact_dots, widen = _exact_dots, _widen
    pos_t = exact_dots(im, tx, ci, torch.arange(n_txt, device=dev))  # each caption with its image
    pos_i, best = best_caption(pos_t, ci, n_img)  # per image: best caption's score and index
    cnt_i = torch.zeros(n_img, dtype=torch.long, device=dev)
    if n_img == 0 or n_txt == 0:
        return torch.where(best < 0, n_txt, cnt_i), torch.zeros(n_txt, dtype=torch.long, device=dev)
    if block_q is None and block_g is None and approx is not True and stats is None \
            and n_img * n_txt <= RANK_DENSE_MAX_PAIRS:
        return _dense_ranks(im, tx, ci, pos_t, pos_i, best)
    na, nt = im.norm(dim=1), tx.norm(dim=1)
    na64, nt64 = na.double(), nt.double()
    # per tile precision: (image side, caption side, row bands, column bands), bands in the tile dtype
    precisions = {"fp32": (im, tx, _bands(pos_i, _fp32_error(na64, nt64.max(), d), torch.float32),
                           _bands(pos_t, _fp32_error(nt64, na64.max(), d), torch.float32))}
    if approx:
        ib, ri = _bf16_residuals(im)
        tb, rt = _bf16_residuals(tx)
        precisions["bf16"] = (ib, tb, _bands(pos_i, _bf16_width(pos_i, na, ri, nt, rt, d), torch.bfloat16),
                              _bands(pos_t, _bf16_width(pos_t, nt, rt, na, ri, d), torch.bfloat16))
    t_setup = time.perf_counter() - t_setup
    int8_lock = threading.Lock()

    def precision_of(name):  # the int8 levels are made when a first tile needs them
        with int8_lock:
            if name not in precisions:
                ia, ta = _int8_split(im, caption_side=False), _int8_split(tx, caption_side=True)
                precisions[name] = (ia, ta, _bands(pos_i, _int8_error(ia, na, ta, nt), torch.float32),
                                    _bands(pos_t, _int8_error(ta, nt, ia, na), torch.float32))
            return precisions[name]

    # ≥ 256 image rows per worker thread (GEMMs, and the C kernels, release the GIL)
    workers = _workers(dev, n_img // 256)
    bi = _block_size(n_img, block_q or RANK_BLOCK_Q, workers)
    bt = max(1, min(block_g or RANK_BLOCK_G, n_txt))
    if bi >= COUNT_GROUP:
        bi = _round_up(bi, COUNT_GROUP)
    size = _round_up(min(bi, n_img), COUNT_GROUP) * _round_up(bt, COUNT_GROUP)
    local = threading.local()
    partial_t = []  # one text→image count vector per worker thread, summed at the end

    def worker_counts():
        if not hasattr(local, "cnt_t"):
            local.cnt_t = torch.zeros(n_txt, dtype=torch.long, device=dev)
            partial_t.append(local.cnt_t)
        return local.cnt_t

    def buffer(name, dtype):  # this worker's buffers: padded bf16 and fp32 tiles, int8 tiles' int32 GEMMs
        if not hasattr(local, name):
            setattr(local, name, torch.empty(size, dtype=dtype, device=dev))
        return getattr(local, name)

    def count_tile(i0, i1, t0, t1, precision, tally, cnt_t, phase):
        """Counts the tile of image rows i0:i1 × captions t0:t1 at `precision` into cnt_i, cnt_t and
        `tally`; False (nothing counted) where a bf16 band holds too many entries."""
        m, n = i1 - i0, t1 - t0
        mp, np_ = _round_up(m, COUNT_GROUP), _round_up(n, COUNT_GROUP)
        t_start = time.perf_counter()
        a, b, (lo_r, hi_r), (lo_c, hi_c) = precision_of(precision)
        s = _tile(buffer(str(lo_r.dtype), lo_r.dtype), mp, np_)
        if precision == "int8":
            g1, g2 = (_tile(buffer(name, torch.int32), m, n) for name in ("g1", "g2"))
            _int8_tile(a, b, slice(i0, i1), slice(t0, t1), g1, g2, s[:m, :n], widen)
        else:
            torch.mm(a[i0:i1], b[t0:t1].T, out=s[:m, :n])
        t_gemm = time.perf_counter()
        tally[phase or "gemm"] += t_gemm - t_start
        max_band = RESOLVE_MAX_FRACTION * m * n if precision == "bf16" else float("inf")
        # band entries are scored in fp32 before exactly, except an fp32 tile's: its band is as wide
        # as the fp32 step's error, so the step would decide nothing
        fp32_step = precision != "fp32"
        if native:
            return scan_count(i0, i1, t0, t1, precision, s[:m, :n], lo_r, hi_r, lo_c, hi_c, max_band, fp32_step,
                              tally, cnt_t, phase)
        if n < np_:
            s[:, n:] = float("-inf")
        if m < mp:
            s[m:] = float("-inf")
        own_r = ((best[i0:i1] >= t0) & (best[i0:i1] < t1)).float()  # positive inside the tile
        own_c = ((ci[t0:t1] >= i0) & (ci[t0:t1] < i1)).float()
        rows = _direction(s, lo_r[i0:i0 + mp].unsqueeze(1), hi_r[i0:i0 + mp].unsqueeze(1), own_r, 1, max_band)
        cols = rows and _direction(s, lo_c[t0:t0 + np_].unsqueeze(0), hi_c[t0:t0 + np_].unsqueeze(0), own_c, 0,
                                   max_band)
        tally[phase or "count"] += time.perf_counter() - t_gemm
        if not cols:
            return False
        tally[precision + "_tiles"] += 1
        t_start = time.perf_counter()
        (rows_hi, (r, c)), (cols_hi, (r2, c2)) = rows, cols
        cnt_i[i0:i1] += rows_hi[:m]
        cnt_t[t0:t1] += cols_hi[:n]
        first = (lambda a, b, r, c, p: _fp32_step(a, b, r, c, p, na, nt)) if fp32_step else None
        img, txt = r + i0, c + t0
        won, band, scored = _beats(im, tx, img, txt, pos_i[img], txt, best[img], first, exact_dots)
        cnt_i.index_add_(0, img, won)
        tally["band_i2t"] += band
        tally["resolved_i2t"] += scored
        img, txt = r2 + i0, c2 + t0
        won, band, scored = _beats(im, tx, img, txt, pos_t[txt], img, ci[txt], first, exact_dots)
        cnt_t.index_add_(0, txt, won)
        tally["band_t2i"] += band
        tally["resolved_t2i"] += scored
        tally["resolve"] += time.perf_counter() - t_start
        return True

    def scan_count(i0, i1, t0, t1, precision, s, lo_r, hi_r, lo_c, hi_c, max_band, fp32_step, tally, cnt_t, phase):
        """count_tile's counting with the C scan (`ranking_native.scan_tile`) of the tile s [m, n]."""
        t_start, exact_seconds = time.perf_counter(), [0.0]

        def beats(rows, cols, dim):
            t = time.perf_counter()
            img, txt = rows + i0, cols + t0
            if dim == 1:
                won = _beats(im, tx, img, txt, pos_i[img], txt, best[img], None, exact_dots)[0]
            else:
                won = _beats(im, tx, img, txt, pos_t[txt], img, ci[txt], None, exact_dots)[0]
            exact_seconds[0] += time.perf_counter() - t
            return won

        own_r = torch.where((best[i0:i1] >= t0) & (best[i0:i1] < t1), best[i0:i1] - t0, -1)
        own_c = torch.where((ci[t0:t1] >= i0) & (ci[t0:t1] < i1), ci[t0:t1] - i0, -1)
        coef = _fp32_error(1.0, 1.0, d) if fp32_step else None
        counts = ranking_native.scan_tile(
            native, s, *(x[i0:i1].float() for x in (lo_r, hi_r)), *(x[t0:t1].float() for x in (lo_c, hi_c)), own_r,
            own_c, im[i0:i1], tx[t0:t1], pos_i[i0:i1], pos_t[t0:t1], na[i0:i1], nt[t0:t1], coef, max_band, beats)
        tally[phase or "count"] += time.perf_counter() - t_start - exact_seconds[0]
        tally[phase or "resolve"] += exact_seconds[0]
        if counts is None:
            return False
        tally[precision + "_tiles"] += 1
        cnt_i[i0:i1] += counts.above_r
        cnt_t[t0:t1] += counts.above_c
        for key, value in zip(("band_i2t", "band_t2i", "resolved_i2t", "resolved_t2i"), counts[2:]):
            tally[key] += value
        return True

    def block(i0):
        i1 = min(n_img, i0 + bi)
        cnt_t = worker_counts()
        tally = dict.fromkeys(TALLIES, 0)
        tally.update(dict.fromkeys(PHASES, 0.0))
        precision = "bf16" if approx else "fp32"
        for t0 in range(0, n_txt, bt):
            t1 = min(n_txt, t0 + bt)
            if precision != "int8" and count_tile(i0, i1, t0, t1, precision, tally, cnt_t, None):
                continue
            phase = "recount" if precision == "bf16" else None  # (its band held too many entries)
            precision = "int8"
            count_tile(i0, i1, t0, t1, precision, tally, cnt_t, phase)
        return tally

    tallies = map_threads(block, range(0, n_img, bi), workers)
    if stats is not None:
        for key in TALLIES:
            stats[key] = sum(t[key] for t in tallies)
        stats["tiles"] = stats["fp32_tiles"] + stats["bf16_tiles"] + stats["int8_tiles"]
        stats["resolved"] = stats["resolved_i2t"] + stats["resolved_t2i"]
        stats["seconds"] = {"setup": t_setup, **{p: sum(t[p] for t in tallies) for p in PHASES}}
    cnt_t = partial_t[0]
    for extra in partial_t[1:]:
        cnt_t += extra
    return torch.where(best < 0, n_txt, cnt_i), cnt_t
