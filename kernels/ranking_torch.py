"""Similarity, streamed top-k and streamed retrieval ranks in tiled torch: the CPU path (the
conventions are in ranking.py).

Tiles of at most block_q × block_g scores; on the CPU, blocks of query rows run concurrently on
worker threads (geomlab.runtime.map_threads), except where `retrieval_ranks` uses its compiled
tile kernels (`_compiled_tile_kernels`), which parallelise inside. On CPUs with bf16 dot-product
instructions both `topk` and `retrieval_ranks` compute their tiles with bf16 GEMMs (several times the fp32 rate)
and still return exact fp32 results: a rigorous bound on the bf16 score error (`_bf16_error`)
says which entries the bf16 scores decide, and only the others are scored exactly.
"""
from __future__ import annotations

import functools
import threading
import time
import warnings
from typing import Callable, NamedTuple

import torch

from geomlab.runtime import cpu_workers, map_threads

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


#: one thread of the idle 2-core development machine (Xeon @ 2.8 GHz, no bf16 instructions; median
#: of 5 runs), measured by deciding 100,000 band entries of one 2048² tile with `_beats` (fp32
#: step, then exact), and by recounting such a tile from an fp32 GEMM with both `_direction`
#: passes: nanoseconds per band entry, and per tile entry.
RESOLVE_NS_PER_ENTRY = 502
RECOUNT_NS_PER_ENTRY = 8.5
#: a bf16 rank tile with more ambiguous entries than this fraction of it is recounted from an fp32
#: GEMM, and so is the rest of its row block: past it the recount costs less than deciding the
#: band (the case of positives in the bulk of their rows, e.g. unrelated random features).
RESOLVE_MAX_FRACTION = RECOUNT_NS_PER_ENTRY / RESOLVE_NS_PER_ENTRY
#: entries per group of a rank tile's line (`_band_masks`): one bit each in the group's band mask.
#: Smaller groups leave fewer empty bits to decode around each band entry, larger ones fewer masks
#: to search (8 measured fastest of 8, 16, 32 and 64 at median ranks 30 and 1% of N).
BAND_GROUP = 8
#: smallest number of image × caption pairs for which `retrieval_ranks` counts its tiles with the
#: compiled tile kernels (`_compiled_tile_kernels`, on the CPU): below it a process's first call
#: would spend longer compiling (a few seconds; later processes read torch's on-disk cache) than it
#: saves.
COMPILE_MIN_PAIRS = 1 << 24
#: smallest number of images and of captions for which `retrieval_ranks` takes bf16 tiles by itself.
RANK_APPROX_MIN = 4096
#: the phases of a rank tile whose time `retrieval_ranks` reports in stats["seconds"]: its GEMM,
#: its comparison and counting passes, the exact scoring of its band entries, and the fp32 GEMM and
#: counting passes of a tile recounted after its bf16 band held too many entries.
PHASES = ("gemm", "count", "resolve", "recount")


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _exact_dots(a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                chunk: int = 8192) -> torch.Tensor:
    """a[rows[k]]·b[cols[k]] for every k, computed in fp64 and rounded once to fp32: the scores that
    decide every rank (a row-wise reduction, so identical vectors always score identically)."""
    out = torch.empty(rows.numel(), device=a.device)
    for k0 in range(0, rows.numel(), chunk):
        k1 = min(rows.numel(), k0 + chunk)
        x = a.index_select(0, rows[k0:k1]).double()
        out[k0:k1] = x.mul_(b.index_select(0, cols[k0:k1]).double()).sum(1)
    return out


def _bands(pos, norm, res, other_norm, other_res, d: int, dtype):
    """(lo, hi) per positive score `pos` of a query row (norm ‖a‖, bf16 residual ‖a − â‖) against
    gallery rows (largest norm and residual `other_*`), in the tile dtype: a tile entry above hi
    surely has an exact score above pos, one below lo surely below; entries in [lo, hi] are
    decided by their exact score. Rows without a positive (pos = −inf) get +inf: they count nothing.

    The half-width is the tile's error bound (`_fp32_error`, `_bf16_error` plus the bf16 output
    rounding, ≤ 2⁻⁸|s|, here with |s| ≤ |pos| + w), and bf16 bounds are rounded outwards."""
    if dtype == torch.float32:
        w = _fp32_error(norm, other_norm, d)
    else:
        w = (1 + 2.0 ** -5) * (_bf16_error(norm, res, other_norm, other_res, d) + 2.0 ** -8 * pos.abs())
    has = pos > float("-inf")
    lo = torch.where(has, pos - w, float("inf"))
    hi = torch.where(has, pos + w, float("inf"))
    # padded with COUNT_GROUP entries, so that a padded tile's slice always exists
    pad = torch.full((COUNT_GROUP,), float("inf"), device=pos.device)
    lo, hi = torch.cat([lo, pad]), torch.cat([hi, pad])
    if dtype == torch.float32:
        return lo, hi
    lo16, hi16 = lo.bfloat16(), hi.bfloat16()
    lo16 = torch.where(lo16.float() > lo, torch.nextafter(lo16, torch.full_like(lo16, float("-inf"))), lo16)
    hi16 = torch.where(hi16.float() < hi, torch.nextafter(hi16, torch.full_like(hi16, float("inf"))), hi16)
    return lo16, hi16


def _band_masks(s: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, dim: int):
    """(#entries > hi, band mask), int32, per group of BAND_GROUP entries of each line of the padded
    tile s [mp, np] along dim; bit k of a group's band mask is set where its entry k lies in
    [lo, hi]. Rows (dim=1, against lo, hi [mp, 1]): [mp, np/BAND_GROUP], group g of a row holding
    its columns g, g + G, g + 2G, … (G = np/BAND_GROUP). Columns (dim=0, against lo, hi [1, np]):
    [mp/BAND_GROUP, np], group g of a column holding its rows g·BAND_GROUP + k. Either way the
    sums run across the rows of a [BAND_GROUP, ·] view, many contiguous lanes at a time, which a
    compiler turns into one vectorised read of the tile (`_compiled_tile_kernels`); interleaving a
    row's groups is what makes that possible for rows."""
    mp, np_ = s.shape
    if dim == 1:
        v, lo, hi = s.view(mp, BAND_GROUP, np_ // BAND_GROUP), lo.unsqueeze(2), hi.unsqueeze(2)
    else:
        v, lo, hi = s.view(mp // BAND_GROUP, BAND_GROUP, np_), lo.unsqueeze(0), hi.unsqueeze(0)
    bit = torch.arange(BAND_GROUP, device=s.device, dtype=torch.int32).view(1, BAND_GROUP, 1)
    in_band = ((v >= lo) & (v <= hi)).to(torch.int32)  # (int32: narrower types compile to slower code)
    return (v > hi).sum(1, dtype=torch.int32), (in_band << bit).sum(1, dtype=torch.int32)


def _gathered_dots(a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """a[rows[k]]·b[cols[k]] for every k in a's dtype: `_fp32_dots`' formula (compiled whole, eager
    in chunks)."""
    return (a[rows] * b[cols]).sum(1)


class CompiledTileKernels(NamedTuple):
    """`_band_masks` and `_fp32_dots` compiled by torch.compile: each direction's comparisons and
    sums fused into one read of the tile (10–20× faster than eager torch's comparison passes, which
    write flag tiles, and their sums), and the band's gathered fp32 dot products without gathering
    the rows into temporaries first (about 25× faster)."""
    masks: Callable
    dots: Callable


@functools.cache
def _compiled_tile_kernels() -> CompiledTileKernels | None:
    """The CompiledTileKernels, compiled once per process for bf16 and fp32 tiles; None where torch
    cannot compile (no C++ compiler): the eager functions then compute the same counts and scores,
    more slowly. Inductor's CPU kernels hold the GIL while they run, so they parallelise inside
    (OpenMP, torch's thread count), not over Python threads: `retrieval_ranks` runs them from one."""
    try:
        masks = torch.compile(_band_masks, dynamic=True)
        gathered = torch.compile(_gathered_dots, dynamic=True)
        for dtype in (torch.bfloat16, torch.float32):
            # unequal sizes throughout, so that the graphs assume no two sizes equal
            tile = torch.zeros(2 * COUNT_GROUP, COUNT_GROUP, dtype=dtype)
            for dim, shape in ((1, (2 * COUNT_GROUP, 1)), (0, (1, COUNT_GROUP))):
                # lo and hi two tensors (the same one twice would compile for `lo is hi` only)
                masks(tile, torch.zeros(shape, dtype=dtype), torch.ones(shape, dtype=dtype), dim)
        gathered(torch.zeros(5, 7), torch.zeros(6, 7), torch.arange(3), torch.arange(3))
    except Exception as e:  # noqa: BLE001 (any failure of the compiler stack: ranks still work)
        warnings.warn(f"retrieval_ranks: torch.compile of its tile kernels failed ({type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}); counting with eager torch, more slowly",
                      RuntimeWarning, stacklevel=2)
        return None

    def dots(a, b, rows, cols):  # (0 or 1 entries would compile graphs of their own)
        return gathered(a, b, rows, cols) if rows.numel() > 1 else _fp32_dots(a, b, rows, cols)

    return CompiledTileKernels(masks, dots)


def _direction(s, lo, hi, own, dim: int, max_band: float, masks):
    """One direction of the padded rank tile s [mp, np] (−inf padding): dim=1 its rows against
    lo, hi [mp, 1], dim=0 its columns against lo, hi [1, np]; own [m] or [n]: 1 where the line's
    positive lies in the tile. Returns (per line: #entries > hi, int64 [mp] or [np]; the band
    entries (rows, cols) in [lo, hi] in tile coordinates, the positives' included), or None when
    the band holds more than max_band entries besides the positives.

    `masks` (`_band_masks`, compiled or not) reads the tile once; the band entries are then
    decoded from the few groups whose band mask is not 0, without reading the tile again."""
    above, mask = masks(s, lo, hi, dim)
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


def _fp32_dots(a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
               chunk: int = 8192) -> torch.Tensor:
    """a[rows[k]]·b[cols[k]] for every k, gathered and accumulated in fp32 (any order: its error is
    within `_fp32_error` of the exact score rounded to fp32, like an fp32 GEMM's)."""
    out = torch.empty(rows.numel(), device=a.device)
    for k0 in range(0, rows.numel(), chunk):
        k1 = min(rows.numel(), k0 + chunk)
        out[k0:k1] = _gathered_dots(a, b, rows[k0:k1], cols[k0:k1])
    return out


def _beats(im, tx, img, txt, pos, gallery, own, norms=None, dots=_fp32_dots):
    """(1 per pair (img[k], txt[k]) whose exact score beats the positive's (score pos[k], gallery
    index own[k]) as gallery item gallery[k] — higher, or equal with a smaller index — else 0;
    the number of pairs decided: all but the positives themselves, which never count; the number
    of those scored exactly).

    With `norms` = (‖image rows‖, ‖text rows‖) the pairs are first scored in fp32 (`dots`,
    `_fp32_dots` or its compiled twin):
    a pair whose fp32 score is more than `_fp32_error` away from pos is decided by it (the exact
    score rounded to fp32 lies on the same side of pos, and is not equal to it); only the others
    are scored exactly. Worth it where the band is wider than that error (bf16 tiles)."""
    n_pairs = img.numel()
    keep = (gallery != own).nonzero().squeeze(1)
    img, txt, pos, gallery, own = (x.index_select(0, keep) for x in (img, txt, pos, gallery, own))
    won = torch.zeros(keep.numel(), dtype=torch.bool, device=img.device)
    exact = torch.arange(keep.numel(), device=img.device)
    if norms is not None and keep.numel():
        f = dots(im, tx, img, txt)
        err = _fp32_error(norms[0].index_select(0, img), norms[1].index_select(0, txt), im.shape[1])
        won = f - err > pos
        exact = ((f + err >= pos) & ~won).nonzero().squeeze(1)
    f = _exact_dots(im, tx, img.index_select(0, exact), txt.index_select(0, exact))
    pos, gallery, own = (x.index_select(0, exact) for x in (pos, gallery, own))
    won[exact] = (f > pos) | ((f == pos) & (gallery < own))
    out = torch.zeros(n_pairs, dtype=torch.long, device=img.device)
    out[keep] = won.long()
    return out, keep.numel(), exact.numel()


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
    copies of the inputs with `approx`).

    Every rank is decided by exact scores (`_exact_dots`): the positives' first (O(N·d)), then each
    tile sorts its entries, per row against the row's positive and per column against the column's,
    into surely above, surely below and a narrow band around the positive (`_bands`), with one
    counting pass per direction (`_direction`); only band entries other than the positive
    itself are scored again: in fp32 first where the tile was bf16 (`_beats`), exactly where that
    leaves them undecided.

    `approx` (default: a CPU with fast bf16 GEMMs and at least RANK_APPROX_MIN images and
    captions) computes the tiles with bf16 GEMMs, whose band is wider; a tile whose band holds
    too many entries (RESOLVE_MAX_FRACTION) is recounted from an fp32 GEMM, as are the rest of its
    row block. Either way the ranks are those of the exact scores. `stats`, if given, receives
    "tiles", "fp32_tiles" (tiles counted from fp32 GEMMs), "band_i2t" and "band_t2i" (band
    entries scored again per direction, the positives' own excluded), "resolved_i2t",
    "resolved_t2i" and their sum "resolved" (those scored exactly), and "seconds": thread-seconds
    (summed over the worker threads; wall seconds with the compiled tile kernels) of each of
    PHASES, and "setup" (the positives' exact scores, norms and bands, before the tiles)."""
    check_pair(image, text)
    n_img, n_txt = image.shape[0], text.shape[0]
    dev, d = image.device, image.shape[1]
    ci = caption_image_rows(caption_image, n_img, n_txt, dev)
    im, tx = _as_f32(image), _as_f32(text)
    if approx is None:
        approx = _fast_bf16_gemm(dev) and min(n_img, n_txt) >= RANK_APPROX_MIN
    t_setup = time.perf_counter()
    pos_t = _exact_dots(im, tx, ci, torch.arange(n_txt, device=dev))  # each caption with its image
    pos_i, best = best_caption(pos_t, ci, n_img)  # per image: best caption's score and index
    cnt_i = torch.zeros(n_img, dtype=torch.long, device=dev)
    if n_img == 0 or n_txt == 0:
        return torch.where(best < 0, n_txt, cnt_i), torch.zeros(n_txt, dtype=torch.long, device=dev)
    if block_q is None and block_g is None and approx is not True and stats is None \
            and n_img * n_txt <= RANK_DENSE_MAX_PAIRS:
        return _dense_ranks(im, tx, ci, pos_t, pos_i, best)
    na, nt = im.norm(dim=1), tx.norm(dim=1)
    # per tile precision: (image rows, caption rows, row bands, column bands), all in its dtype
    precisions = {torch.float32: (im, tx, _bands(pos_i, na, None, nt.max(), None, d, torch.float32),
                                  _bands(pos_t, nt, None, na.max(), None, d, torch.float32))}
    if approx:
        ib, ri = _bf16_residuals(im)
        tb, rt = _bf16_residuals(tx)
        precisions[torch.bfloat16] = (ib, tb, _bands(pos_i, na, ri, nt.max(), rt.max(), d, torch.bfloat16),
                                      _bands(pos_t, nt, rt, na.max(), ri.max(), d, torch.bfloat16))
    t_setup = time.perf_counter() - t_setup
    compiled = _compiled_tile_kernels() if dev.type == "cpu" and n_img * n_txt >= COMPILE_MIN_PAIRS else None
    masks, dots = (compiled.masks, compiled.dots) if compiled else (_band_masks, _fp32_dots)
    # ≥ 256 image rows per worker thread; one thread with the compiled kernels (they hold the GIL:
    # threads would queue for it), whose GEMMs and kernels then use torch's threads instead
    workers = 1 if compiled else _workers(dev, n_img // 256)
    bi = _block_size(n_img, block_q or RANK_BLOCK_Q, workers)
    bt = max(1, min(block_g or RANK_BLOCK_G, n_txt))
    if bi >= COUNT_GROUP:
        bi = _round_up(bi, COUNT_GROUP)
    local = threading.local()
    partial_t = []  # one text→image count vector per worker thread, summed at the end

    def worker_counts():
        if not hasattr(local, "cnt_t"):
            local.cnt_t = torch.zeros(n_txt, dtype=torch.long, device=dev)
            partial_t.append(local.cnt_t)
        return local.cnt_t

    def buffer(dtype):  # this worker's tile buffer in the tile dtype
        if not hasattr(local, str(dtype)):
            size = _round_up(min(bi, n_img), COUNT_GROUP) * _round_up(bt, COUNT_GROUP)
            setattr(local, str(dtype), torch.empty(size, dtype=dtype, device=dev))
        return getattr(local, str(dtype))

    def block(i0):
        i1 = min(n_img, i0 + bi)
        m = i1 - i0
        mp = _round_up(m, COUNT_GROUP)
        cnt_t = worker_counts()
        tiles = fp32_tiles = band_i2t = band_t2i = resolved_i2t = resolved_t2i = 0
        seconds = dict.fromkeys(PHASES, 0.0)
        dtype = torch.bfloat16 if approx else torch.float32
        for t0 in range(0, n_txt, bt):
            t1 = min(n_txt, t0 + bt)
            n = t1 - t0
            np_ = _round_up(n, COUNT_GROUP)
            own_r = ((best[i0:i1] >= t0) & (best[i0:i1] < t1)).float()  # positive inside the tile
            own_c = ((ci[t0:t1] >= i0) & (ci[t0:t1] < i1)).float()
            recount = False
            while True:
                a, b, (lo_r, hi_r), (lo_c, hi_c) = precisions[dtype]
                buf = buffer(dtype)
                t_start = time.perf_counter()
                s = _tile(buf, mp, np_)
                torch.mm(a[i0:i1], b[t0:t1].T, out=s[:m, :n])
                if n < np_:
                    s[:, n:] = float("-inf")
                if m < mp:
                    s[m:] = float("-inf")
                t_gemm = time.perf_counter()
                max_band = float("inf") if dtype == torch.float32 else RESOLVE_MAX_FRACTION * m * n
                rows = _direction(s, lo_r[i0:i0 + mp].unsqueeze(1), hi_r[i0:i0 + mp].unsqueeze(1), own_r, 1,
                                  max_band, masks)
                cols = rows and _direction(s, lo_c[t0:t0 + np_].unsqueeze(0), hi_c[t0:t0 + np_].unsqueeze(0), own_c,
                                           0, max_band, masks)
                t_count = time.perf_counter()
                phase = "recount" if recount else None
                seconds[phase or "gemm"] += t_gemm - t_start
                seconds[phase or "count"] += t_count - t_gemm
                if cols:
                    break
                dtype = torch.float32  # too many entries to decide exactly: recount in fp32
                recount = True
            tiles += 1
            fp32_tiles += dtype == torch.float32
            t_start = time.perf_counter()
            (rows_hi, (r, c)), (cols_hi, (r2, c2)) = rows, cols
            cnt_i[i0:i1] += rows_hi[:m]
            cnt_t[t0:t1] += cols_hi[:n]
            norms = (na, nt) if dtype == torch.bfloat16 else None  # an fp32 band is as wide as that step's error
            img, txt = r + i0, c + t0
            won, band, scored = _beats(im, tx, img, txt, pos_i[img], txt, best[img], norms, dots)
            cnt_i.index_add_(0, img, won)
            band_i2t += band
            resolved_i2t += scored
            img, txt = r2 + i0, c2 + t0
            won, band, scored = _beats(im, tx, img, txt, pos_t[txt], img, ci[txt], norms, dots)
            cnt_t.index_add_(0, txt, won)
            band_t2i += band
            resolved_t2i += scored
            seconds["resolve"] += time.perf_counter() - t_start
        return tiles, fp32_tiles, band_i2t, band_t2i, resolved_i2t, resolved_t2i, seconds

    counts = map_threads(block, range(0, n_img, bi), workers)
    if stats is not None:
        for key, value in zip(("tiles", "fp32_tiles", "band_i2t", "band_t2i", "resolved_i2t", "resolved_t2i"),
                              map(sum, zip(*counts))):
            stats[key] = value
        stats["resolved"] = stats["resolved_i2t"] + stats["resolved_t2i"]
        stats["seconds"] = {"setup": t_setup, **{p: sum(c[-1][p] for c in counts) for p in PHASES}}
    cnt_t = partial_t[0]
    for extra in partial_t[1:]:
        cnt_t += extra
    return torch.where(best < 0, n_txt, cnt_i), cnt_t
