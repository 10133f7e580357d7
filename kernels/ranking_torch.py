"""Similarity, streamed top-k and streamed retrieval ranks in tiled torch: the CPU path (the
conventions are in ranking.py).

Tiles of at most block_q × block_g fp32 scores; on the CPU, blocks of query rows run concurrently
on worker threads (geomlab.runtime.map_threads).
"""
from __future__ import annotations

import threading

import torch

from geomlab.runtime import cpu_workers, map_threads

from .ranking import best_caption, caption_image_rows, check_pair


def _as_f32(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous() if x.dtype == torch.float32 else x.float().contiguous()


#: query rows × gallery columns of one fp32 score tile of the torch backend: 4096 × 4096 = 64 MiB
#: per worker thread (ranks: two such buffers), big enough for an efficient GEMM and few Python
#: steps, small enough that N is bounded by time, not memory.
TOPK_BLOCK_Q = 4096
TOPK_BLOCK_G = 4096
RANK_BLOCK_Q = 4096
RANK_BLOCK_G = 4096


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


#: width of the column segments whose maxima prune the selection (see `_above`).
SEGMENT = 64


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
               buf16: torch.Tensor | None = None):
    """Streamed top-k of the query rows qb against every gallery tile. With bf16 qb and g, each
    tile's GEMM runs in bf16 into `buf16` and is widened into `buf` (fp32 selection is faster)."""
    m, ng, dev = qb.shape[0], g.shape[0], qb.device
    # running lists [m, w ≤ k], sorted (score desc, index asc); candidates wait in `pending`
    # and are merged in batches, so most tiles cost one GEMM and one pruning pass.
    run_v = torch.empty(m, 0, device=dev)
    run_i = torch.empty(m, 0, dtype=torch.long, device=dev)
    pending, n_pending = [], 0
    for g0 in range(0, ng, bg):
        g1 = min(ng, g0 + bg)
        n = g1 - g0
        if buf16 is None:
            s = torch.mm(qb, g[g0:g1].T, out=_tile(buf, m, n))
        else:
            s = _tile(buf, m, n).copy_(torch.mm(qb, g[g0:g1].T, out=_tile(buf16, m, n)))
        w = run_v.shape[1]
        if w < k:  # warm-up: the lists are not full yet
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
                kth = kth.float()  # (bf16 tiles in the approximate pass of topk)
                thr = torch.nextafter(kth, torch.full_like(kth, float("-inf")))
                if w:
                    thr = torch.minimum(thr, run_v[:, -1:])
                rows, cols, vals = _above(s, thr, segmax)
            run_v, run_i = _merge(run_v, run_i, [(rows, cols + g0, vals)], k)
            continue
        rows, cols, vals = _above(s, run_v[:, -1:])
        if rows.numel():
            pending.append((rows, cols + g0, vals))
            n_pending += rows.numel()
        if n_pending > 2 * m * k:  # tighten the threshold
            run_v, run_i = _merge(run_v, run_i, pending, k)
            pending, n_pending = [], 0
    if pending:
        run_v, run_i = _merge(run_v, run_i, pending, k)
    return run_v, run_i


#: extra candidates per query kept by the bf16 pass of `topk` (then rescored exactly).
APPROX_EXTRA = 32
#: gallery size from which `topk` takes the bf16 pass by itself (where bf16 GEMMs are fast).
APPROX_MIN_GALLERY = 16384


def _fast_bf16_gemm(device) -> bool:
    """True on CPUs with bf16 dot-product instructions (AVX512-BF16 / AMX), where a bf16 GEMM with
    fp32 accumulation runs about twice as fast as an fp32 one."""
    if device.type != "cpu":
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read(1 << 16)
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def _bf16_error_bound(d: int) -> float:
    """Bound on |approx − q·g| / (‖q‖ ‖g‖) of a bf16 GEMM score: input roundings (2u + u²),
    fp32 accumulation (d·2⁻²⁴) and the bf16 output rounding (u), u = 2⁻⁹; doubled for margin."""
    u = 2.0 ** -9
    return 2 * (3 * u + u * u + d * 2.0 ** -23)


def _rescore(q: torch.Tensor, g: torch.Tensor, idx: torch.Tensor, k: int, chunk: int = 512):
    """Exact fp32 scores of the candidates idx [m, c], sorted (score desc, index asc): top k."""
    idx = idx.sort(dim=1).values  # ascending index first: the stable sort below then breaks ties by index
    scores = torch.empty(idx.shape, device=q.device)
    for r0 in range(0, q.shape[0], chunk):
        r1 = min(q.shape[0], r0 + chunk)
        scores[r0:r1] = torch.bmm(g[idx[r0:r1]], q[r0:r1].unsqueeze(2)).squeeze(2)
    v, order = scores.sort(dim=1, descending=True, stable=True)
    return v[:, :k], torch.gather(idx, 1, order[:, :k])


def topk(queries: torch.Tensor, gallery: torch.Tensor, k: int, *, block_q: int | None = None,
               block_g: int | None = None, approx: bool | None = None):
    """(values [Nq, k] fp32, indices [Nq, k] int64) of the k highest scores q·g per query, streamed
    over gallery tiles: per tile one GEMM into a reusable buffer, then only the entries above the
    running k-th value of their row are selected (threshold pruning) and merged. Never more than
    one block_q × block_g tile of scores per worker thread exists.

    `approx` (default: fp32 inputs, a large gallery and a CPU with fast bf16 GEMMs) first finds
    k + APPROX_EXTRA candidates per query with bf16 GEMMs, then rescores them in fp32. The result
    is still exact: a query is accepted only if its exact k-th score beats the last candidate's
    bf16 score by more than the bf16 error bound (so no other item can reach it); the few queries
    that fail this test are recomputed with the fp32 pass."""
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
        qa, ga = q.bfloat16(), g.bfloat16()
        bound = _bf16_error_bound(q.shape[1]) * q.norm(dim=1) * g.norm(dim=1).max()
    out_v = torch.empty(nq, k, device=dev)
    out_i = torch.empty(nq, k, dtype=torch.long, device=dev)
    local = threading.local()

    def exact(q0, q1):
        if not hasattr(local, "buf"):
            local.buf = torch.empty(bq * bg, device=dev)
        return _topk_rows(q[q0:q1], g, k, bg, local.buf)

    def block(q0):
        q1 = min(nq, q0 + bq)
        if not approx:
            out_v[q0:q1], out_i[q0:q1] = exact(q0, q1)
            return
        if not hasattr(local, "buf16"):
            local.buf = torch.empty(bq * bg, device=dev)
            local.buf16 = torch.empty(bq * bg, device=dev, dtype=torch.bfloat16)
        cand_v, cand_i = _topk_rows(qa[q0:q1], ga, k + APPROX_EXTRA, bg, local.buf, local.buf16)
        v, i = _rescore(q[q0:q1], g, cand_i, k)
        bad = (v[:, -1] <= cand_v[:, -1] + bound[q0:q1]).nonzero().squeeze(1)
        for r in bad.tolist():  # rare: recompute exactly
            v[r], i[r] = exact(q0 + r, q0 + r + 1)
        out_v[q0:q1], out_i[q0:q1] = v, i

    map_threads(block, range(0, nq, bq), workers)
    return out_v, out_i


def retrieval_ranks(image: torch.Tensor, text: torch.Tensor, caption_image=None, *,
                          block_q: int | None = None, block_g: int | None = None):
    """(image→text ranks [N_img], text→image ranks [N_txt]), int64, streamed: one pass over
    image-block × text-block tiles counts both directions (rows for image→text, columns for
    text→image); memory beyond the inputs is one tile plus O(N) vectors."""
    check_pair(image, text)
    n_img, n_txt = image.shape[0], text.shape[0]
    dev = image.device
    ci = caption_image_rows(caption_image, n_img, n_txt, dev)
    im, tx = _as_f32(image), _as_f32(text)
    bi = max(1, min(block_q or RANK_BLOCK_Q, n_img))
    bt = max(1, min(block_g or RANK_BLOCK_G, n_txt))
    # Positive scores first, with the same GEMM arithmetic as the tiles: (image rows × text cols).
    pos_t = torch.empty(n_txt, device=dev)
    for t0 in range(0, n_txt, bt):
        t1 = min(n_txt, t0 + bt)
        pos_t[t0:t1] = torch.mm(im.index_select(0, ci[t0:t1]), tx[t0:t1].T).diagonal()
    pos_i, best = best_caption(pos_t, ci, n_img)  # per image: best caption's score and index
    neg_inf = torch.tensor(float("-inf"), device=dev)
    pos_t_prev = torch.nextafter(pos_t, neg_inf)  # the largest float below each positive score
    pos_i_prev = torch.nextafter(pos_i, neg_inf)
    workers = _workers(dev, n_img // 256)  # ≥ 256 image rows per worker
    bi = _block_size(n_img, bi, workers)
    cnt_i = torch.zeros(n_img, dtype=torch.long, device=dev)
    local = threading.local()
    partial_t = []  # one text→image count vector per worker thread, summed at the end

    def block(i0):
        if not hasattr(local, "buf"):
            local.buf = torch.empty(bi * bt, device=dev)
            local.flags = torch.empty(bi * bt, device=dev)
            local.cnt_t = torch.zeros(n_txt, dtype=torch.long, device=dev)
            partial_t.append(local.cnt_t)
        buf, cnt_t = local.buf, local.cnt_t
        i1 = min(n_img, i0 + bi)
        pr, br, pr_prev = pos_i[i0:i1].unsqueeze(1), best[i0:i1], pos_i_prev[i0:i1]
        ci_ = cnt_i[i0:i1]
        # A gallery item j counts against a positive at index p with score pos iff
        # (j < p and s_j ≥ pos) or (j > p and s_j > pos). For a tile on one side of p that is one
        # comparison `s > thr`, thr = pos (tile after p) or the next float below pos (tile before
        # p, or containing p): one pass per direction. Where p lies inside the tile, that counted
        # every s_j ≥ pos; the ties at j ≥ p (the positive itself included) are then taken off,
        # and so is the positive if rounding put its tile entry above pos (it never counts).
        for t0 in range(0, n_txt, bt):
            t1 = min(n_txt, t0 + bt)
            s = torch.mm(im[i0:i1], tx[t0:t1].T, out=_tile(buf, i1 - i0, t1 - t0))
            flags = _tile(local.flags, i1 - i0, t1 - t0)
            # image→text (rows)
            thr = torch.where(br < t0, pr[:, 0], pr_prev).unsqueeze(1)
            # comparisons written as 0/1 floats: float sums are several times faster than bool
            # sums, and exact (a tile row holds far fewer than 2^24 entries)
            cnt = torch.gt(s, thr, out=flags).sum(1).long()
            inside = ((br >= t0) & (br < t1)).nonzero().squeeze(1)
            if inside.numel():
                r, c = (s == pr).nonzero(as_tuple=True)
                b = br[r]
                r = r[(b >= t0) & (b < t1) & (c + t0 >= b)]
                cnt.index_add_(0, r, torch.full_like(r, -1))
                above = s[inside, br[inside] - t0] > pr[inside, 0]
                cnt.index_add_(0, inside, -above.long())
            ci_ += cnt
            # text→image (columns)
            pc, pcp, cc = pos_t[t0:t1], pos_t_prev[t0:t1], ci[t0:t1]
            thr = torch.where(cc < i0, pc, pcp).unsqueeze(0)
            cnt = torch.gt(s, thr, out=flags).sum(0).long()
            inside = ((cc >= i0) & (cc < i1)).nonzero().squeeze(1)
            if inside.numel():
                r, c = (s == pc.unsqueeze(0)).nonzero(as_tuple=True)
                p = cc[c]
                c = c[(p >= i0) & (p < i1) & (r + i0 >= p)]
                cnt.index_add_(0, c, torch.full_like(c, -1))
                above = s[cc[inside] - i0, inside] > pc[inside]
                cnt.index_add_(0, inside, -above.long())
            cnt_t[t0:t1] += cnt

    map_threads(block, range(0, n_img, bi), workers)
    cnt_t = partial_t[0] if partial_t else torch.zeros(n_txt, dtype=torch.long, device=dev)
    for extra in partial_t[1:]:
        cnt_t += extra
    return cnt_i, cnt_t
