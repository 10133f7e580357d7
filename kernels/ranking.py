"""Similarity, streamed top-k and streamed retrieval ranks (SPEC §5.3, §6).

Two backends, each with the same memory property (no N×N matrix, only tiles):

* ``*_triton``: Triton kernels (Liger-Kernel style: ``@triton.jit`` kernels + plain launchers).
  Autotuned block sizes on the GPU, one fixed configuration under ``TRITON_INTERPRET=1``.
* ``*_torch``: the same tiling in plain torch (the CPU path).

Conventions shared by every backend (and by ``reference`` up to ties):

* Inputs are fp32/bf16/fp16 features; every score is accumulated in fp32 (fp32 products are exact
  IEEE fp32 on the GPU: ``input_precision="ieee"``, never TF32).
* ``topk`` returns the k best gallery items per query ordered by (score descending, index
  ascending): among equal scores the smaller gallery index wins. ``reference.topk`` (dense
  ``torch.topk``) has the same values but may order tied indices differently.
* ``retrieval_ranks``: rank = #gallery items scoring strictly higher than the positive + #items
  scoring equal with a smaller index. The positive's score is computed first with the same GEMM
  arithmetic as the tiles, and the positive itself is never counted against itself. With several
  captions per image (``caption_image[c]`` = image row of caption c) an image's rank is that of
  its best caption (the best caption is the one with the highest score, smallest index on ties,
  which is exactly the caption of minimum rank); the text→image rank is that of the caption's image.
"""
from __future__ import annotations

import os

import torch

try:  # triton is a dependency, but keep the torch paths importable without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
    tl = None

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"expected 2-D feature matrices, got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    if a.device != b.device:
        raise ValueError(f"inputs on different devices: {a.device} vs {b.device}")


def _as_f32(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous() if x.dtype == torch.float32 else x.float().contiguous()


def _caption_image(caption_image, n_img: int, n_txt: int, device) -> torch.Tensor:
    if caption_image is None:
        if n_img != n_txt:
            raise ValueError("image and text must have the same number of rows without caption_image")
        return torch.arange(n_txt, device=device)
    ci = torch.as_tensor(caption_image, device=device).long().reshape(-1)
    if ci.numel() != n_txt:
        raise ValueError(f"caption_image has {ci.numel()} entries for {n_txt} captions")
    if n_txt and (int(ci.min()) < 0 or int(ci.max()) >= n_img):
        raise ValueError(f"caption_image entries must lie in [0, {n_img})")
    return ci


def _best_caption(pos: torch.Tensor, ci: torch.Tensor, n_img: int):
    """Per image: (score of its best caption, index of that caption); images without a caption get
    (-inf, -1). Best = highest score, smallest caption index on ties."""
    dev = pos.device
    best = torch.full((n_img,), float("-inf"), device=dev)
    best = best.scatter_reduce(0, ci, pos, reduce="amax", include_self=True)
    n_txt = ci.numel()
    cand = torch.where(pos == best[ci], torch.arange(n_txt, device=dev), torch.full_like(ci, n_txt))
    idx = torch.full((n_img,), n_txt, dtype=torch.long, device=dev)
    idx = idx.scatter_reduce(0, ci, cand, reduce="amin", include_self=True)
    idx = torch.where(idx == n_txt, torch.full_like(idx, -1), idx)
    return best, idx


# --------------------------------------------------------------------------------------------
# torch backend (tiled; the CPU path)
# --------------------------------------------------------------------------------------------

#: query rows × gallery columns of one fp32 score tile of the torch backend: 4096 × 4096 = 64 MiB
#: per worker thread (ranks: two such buffers), big enough for an efficient GEMM and few Python
#: steps, small enough that N is bounded by time, not memory.
TOPK_BLOCK_Q = 4096
TOPK_BLOCK_G = 4096
RANK_BLOCK_Q = 4096
RANK_BLOCK_G = 4096


def similarity_torch(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The full fp32 matrix a·bᵀ (the caller asked for it; fp32 accumulation)."""
    _check_pair(a, b)
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


def _cpu_workers(device, n_blocks: int) -> int:
    """Worker threads for the CPU paths: one per intra-op thread (see `_run_blocks`)."""
    if device.type != "cpu" or n_blocks < 2:
        return 1
    return max(1, min(torch.get_num_threads(), n_blocks))


def _block_size(n: int, block: int, workers: int) -> int:
    """A block size ≤ `block` that splits n rows into a multiple of `workers` blocks (balance)."""
    if workers <= 1:
        return max(1, min(block, n))
    nb = -(-n // block)
    nb = -(-nb // workers) * workers
    return max(1, -(-n // nb))


def _run_blocks(fn, blocks, workers: int):
    """fn(block) for every block. On the CPU with several threads, the blocks run concurrently in
    `workers` Python threads while torch's intra-op pool is set to one thread (restored after):
    each thread's GEMMs and selections then run without any cross-thread barrier, which on a
    small shared machine is much faster than two-thread ops one after another (torch ops release
    the GIL). Note: during the call, torch ops of other Python threads also run single-threaded."""
    if workers <= 1:
        return [fn(b) for b in blocks]
    from concurrent.futures import ThreadPoolExecutor

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(fn, blocks))
    finally:
        torch.set_num_threads(saved)


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
                kth = kth.float()  # (bf16 tiles in the approximate pass of topk_torch)
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


#: extra candidates per query kept by the bf16 pass of `topk_torch` (then rescored exactly).
APPROX_EXTRA = 32
#: gallery size from which `topk_torch` takes the bf16 pass by itself (where bf16 GEMMs are fast).
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


def topk_torch(queries: torch.Tensor, gallery: torch.Tensor, k: int, *, block_q: int | None = None,
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
    _check_pair(queries, gallery)
    nq, ng = queries.shape[0], gallery.shape[0]
    if not 0 < k <= ng:
        raise ValueError(f"k must lie in [1, {ng}] (gallery size), got {k}")
    dev = queries.device
    if approx is None:
        approx = (queries.dtype == gallery.dtype == torch.float32 and ng >= APPROX_MIN_GALLERY
                  and _fast_bf16_gemm(dev))
    approx = approx and k + APPROX_EXTRA < ng
    bq0 = min(block_q or TOPK_BLOCK_Q, max(nq, 1))
    workers = _cpu_workers(dev, nq // 256)  # ≥ 256 query rows per worker
    bq = _block_size(nq, bq0, workers)
    bg = min(block_g or TOPK_BLOCK_G, ng)
    q, g = _as_f32(queries), _as_f32(gallery)
    if approx:
        qa, ga = q.bfloat16(), g.bfloat16()
        bound = _bf16_error_bound(q.shape[1]) * q.norm(dim=1) * g.norm(dim=1).max()
    out_v = torch.empty(nq, k, device=dev)
    out_i = torch.empty(nq, k, dtype=torch.long, device=dev)
    local = __import__("threading").local()

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

    _run_blocks(block, range(0, nq, bq), workers)
    return out_v, out_i


def retrieval_ranks_torch(image: torch.Tensor, text: torch.Tensor, caption_image=None, *,
                          block_q: int | None = None, block_g: int | None = None):
    """(image→text ranks [N_img], text→image ranks [N_txt]), int64, streamed: one pass over
    image-block × text-block tiles counts both directions (rows for image→text, columns for
    text→image); memory beyond the inputs is one tile plus O(N) vectors."""
    _check_pair(image, text)
    n_img, n_txt = image.shape[0], text.shape[0]
    dev = image.device
    ci = _caption_image(caption_image, n_img, n_txt, dev)
    im, tx = _as_f32(image), _as_f32(text)
    bi = max(1, min(block_q or RANK_BLOCK_Q, n_img))
    bt = max(1, min(block_g or RANK_BLOCK_G, n_txt))
    # Positive scores first, with the same GEMM arithmetic as the tiles: (image rows × text cols).
    pos_t = torch.empty(n_txt, device=dev)
    for t0 in range(0, n_txt, bt):
        t1 = min(n_txt, t0 + bt)
        pos_t[t0:t1] = torch.mm(im.index_select(0, ci[t0:t1]), tx[t0:t1].T).diagonal()
    pos_i, best = _best_caption(pos_t, ci, n_img)  # per image: best caption's score and index
    neg_inf = torch.tensor(float("-inf"), device=dev)
    pos_t_prev = torch.nextafter(pos_t, neg_inf)  # the largest float below each positive score
    pos_i_prev = torch.nextafter(pos_i, neg_inf)
    workers = _cpu_workers(dev, n_img // 256)  # ≥ 256 image rows per worker
    bi = _block_size(n_img, bi, workers)
    cnt_i = torch.zeros(n_img, dtype=torch.long, device=dev)
    local = __import__("threading").local()
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

    _run_blocks(block, range(0, n_img, bi), workers)
    cnt_t = partial_t[0] if partial_t else torch.zeros(n_txt, dtype=torch.long, device=dev)
    for extra in partial_t[1:]:
        cnt_t += extra
    return cnt_i, cnt_t


# --------------------------------------------------------------------------------------------
# Triton backend
# --------------------------------------------------------------------------------------------

def _configs(interpret_cfg: dict, gpu_cfgs: list[tuple]):
    """One fixed configuration under the interpreter, a small autotuning space on the GPU."""
    if _INTERPRET:
        return [triton.Config(interpret_cfg, num_warps=1, num_stages=1)]
    return [triton.Config(dict(zip(("BLOCK_M", "BLOCK_N", "BLOCK_K"), c[:3])), num_warps=c[3], num_stages=c[4])
            for c in gpu_cfgs]


_GEMM_GPU = [(128, 128, 32, 8, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (64, 64, 64, 4, 3),
             (128, 128, 64, 8, 3)]
_SELECT_GPU = [(64, 64, 32, 4, 3), (64, 128, 32, 4, 3), (128, 64, 32, 8, 3), (32, 128, 32, 4, 3)]
_INTERP = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)

if triton is not None:
    # Under TRITON_INTERPRET=1, tl.dot on bf16/fp16 tiles returns garbage (triton 3.x interpreter):
    # upcast the tiles first (bf16·bf16 products are exact in fp32, so the math is unchanged).
    _UPCAST = tl.constexpr(_INTERPRET)

if triton is not None:

    @triton.jit
    def _dot_tile(a_ptr, b_ptr, rows, cols, M, N, K, stride_am, stride_bn,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  IEEE: tl.constexpr):
        """fp32 tile A[rows] · B[cols]ᵀ over the whole K (masked edges; out-of-range entries 0)."""
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        offs_k = tl.arange(0, BLOCK_K)
        rmask = rows < M
        cmask = cols < N
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            kmask = kk < K
            a = tl.load(a_ptr + rows[:, None].to(tl.int64) * stride_am + kk[None, :],
                        mask=rmask[:, None] & kmask[None, :], other=0.0)
            b = tl.load(b_ptr + cols[None, :].to(tl.int64) * stride_bn + kk[:, None],
                        mask=cmask[None, :] & kmask[:, None], other=0.0)
            if _UPCAST:  # the interpreter's bf16/fp16 dot is wrong; exact fp32 products instead
                acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
            elif IEEE:
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
        return acc

    @triton.autotune(configs=_configs(_INTERP, _GEMM_GPU), key=["M", "N", "K", "IEEE"])
    @triton.jit
    def _similarity_kernel(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_bn, stride_cm,
                           IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = _dot_tile(a_ptr, b_ptr, rows, cols, M, N, K, stride_am, stride_bn,
                        BLOCK_M, BLOCK_N, BLOCK_K, IEEE)
        tl.store(c_ptr + rows[:, None].to(tl.int64) * stride_cm + cols[None, :], acc,
                 mask=(rows[:, None] < M) & (cols[None, :] < N))

    @triton.autotune(configs=_configs(_INTERP, _SELECT_GPU), key=["M", "N", "K", "IEEE", "TOPK"])
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
            s = _dot_tile(q_ptr, g_ptr, rows, cols, M, N, K, stride_qm, stride_gn,
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
        acc = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float32)
        offs_k = tl.arange(0, BLOCK_K)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            kmask = kk < K
            a = tl.load(q_ptr + rows[:, None].to(tl.int64) * stride_qm + kk[None, :],
                        mask=(rows[:, None] < M) & kmask[None, :], other=0.0)
            b = tl.load(g_ptr + tl.maximum(p, 0)[None, :].to(tl.int64) * stride_gn + kk[:, None],
                        mask=has[None, :] & kmask[:, None], other=0.0)
            if _UPCAST:  # the interpreter's bf16/fp16 dot is wrong; exact fp32 products instead
                acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
            elif IEEE:
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
        eye = tl.arange(0, BLOCK_M)[:, None] == tl.arange(0, BLOCK_M)[None, :]
        pos = tl.sum(tl.where(eye, acc, 0.0), 1)
        tl.store(pos_ptr + rows, tl.where(has, pos, float("-inf")), mask=rows < M)

    @triton.autotune(configs=_configs(_INTERP, _SELECT_GPU), key=["M", "N", "K", "IEEE"])
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
            s = _dot_tile(q_ptr, g_ptr, rows, cols, M, N, K, stride_qm, stride_gn,
                          BLOCK_M, BLOCK_N, BLOCK_K, IEEE)
            c = cols[None, :].to(tl.int64)
            valid = cols[None, :] < N
            hit = valid & (c != p[:, None]) & (s > pos[:, None])
            hit |= valid & (c < p[:, None]) & (s == pos[:, None])
            cnt += tl.sum(hit.to(tl.int64), 1)
        tl.store(out_ptr + rows, cnt, mask=rows < M)


def _triton_inputs(a: torch.Tensor, b: torch.Tensor):
    _check_pair(a, b)
    if triton is None:
        raise RuntimeError("the triton backend needs the triton package")
    if not (a.is_cuda or _INTERPRET):
        raise RuntimeError("the triton backend needs a CUDA device (or TRITON_INTERPRET=1)")
    ok = (torch.float32, torch.float16, torch.bfloat16)
    if a.dtype not in ok or b.dtype not in ok:
        raise TypeError(f"features must be fp32, fp16 or bf16, got {a.dtype} and {b.dtype}")
    if a.dtype != b.dtype:
        a, b = a.float(), b.float()
    return a.contiguous(), b.contiguous(), a.dtype == torch.float32


def similarity_triton(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
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


def topk_triton(queries: torch.Tensor, gallery: torch.Tensor, k: int):
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
    bm, bk = (16, 16) if _INTERPRET else (32, 32)
    _positive_kernel[(triton.cdiv(M, bm),)](q, g, p, pos, M, K, q.stride(0), g.stride(0),
                                            IEEE=ieee, BLOCK_M=bm, BLOCK_K=bk)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)  # noqa: E731
    _rank_kernel[grid](q, g, pos, p, out, M, N, K, q.stride(0), g.stride(0), IEEE=ieee)
    return out, pos


def retrieval_ranks_triton(image: torch.Tensor, text: torch.Tensor, caption_image=None):
    im, tx, ieee = _triton_inputs(image, text)
    n_img, n_txt = im.shape[0], tx.shape[0]
    ci = _caption_image(caption_image, n_img, n_txt, im.device)
    t2i, pos = _ranks_one_way(tx, im, ci.contiguous(), ieee)
    # best caption per image (highest positive score, smallest index on ties); images without a
    # caption get p = -1, pos = -inf, so every caption outranks them (rank N_txt, as `reference`)
    _, best = _best_caption(pos, ci, n_img)
    i2t, _ = _ranks_one_way(im, tx, best.contiguous(), ieee)
    return i2t, t2i
