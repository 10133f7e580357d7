"""retrieval_ranks' CPU kernels in C: the counting scan of a tile, which counts both directions'
entries surely above their positives and scores each band entry in fp32 on the spot; the exact
scores; and the widening of an int8 tile's two int32 GEMM results to fp32 scores
(docs/definitions.md, "Counting a tile").

Why C: a band entry needs a gathered dot product, which no fused torch operation expresses. In
torch the band is first decoded into index lists (several passes over them), then scored by a
gathered fp32 step; about 65 ns per band entry on the 2-core development machine, against 16–24
where bands are dense here, where each entry is scored while its tile row is in cache and its
caption rows in L2 (the tile is scanned SCAN_COLUMNS columns at a time).

SOURCE is built once per machine with the system C compiler (`$CC`, else `cc`) into a cache
directory (`$GEOMLAB_CACHE`, else `~/.cache/geomlab`), keyed by the source, the flags, the
compiler and the CPU, and loaded with ctypes, whose calls release the GIL: `retrieval_ranks`'
worker threads run them side by side. Where no compiler works, `native_kernels` warns once and
returns None, and `retrieval_ranks` counts and scores with torch.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Callable, NamedTuple

import torch

SOURCE = r"""
#include <stdint.h>
#include <string.h>

typedef float vec16 __attribute__((vector_size(64), aligned(4), may_alias));  /* unaligned loads of fp32 rows */

static inline float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* x·y in fp32, four accumulators (any order: the caller's bound allows every one) */
static inline float dot(const float *restrict x, const float *restrict y, int64_t d) {
    vec16 s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
    int64_t k = 0;
    for (; k + 64 <= d; k += 64) {
        s0 += *(const vec16 *)(x + k) * *(const vec16 *)(y + k);
        s1 += *(const vec16 *)(x + k + 16) * *(const vec16 *)(y + k + 16);
        s2 += *(const vec16 *)(x + k + 32) * *(const vec16 *)(y + k + 32);
        s3 += *(const vec16 *)(x + k + 48) * *(const vec16 *)(y + k + 48);
    }
    for (; k + 16 <= d; k += 16) s0 += *(const vec16 *)(x + k) * *(const vec16 *)(y + k);
    vec16 s = (s0 + s1) + (s2 + s3);
    float f = 0.0f;
    for (int t = 0; t < 16; t++) f += s[t];
    for (; k < d; k++) f += x[k] * y[k];
    return f;
}

/* one chunk of a tile row: counts entries above the row's and each column's hi, flags band
   entries (bit 0: the row's band, bit 1: the column's) */
#define COMPARE(LOAD)                                                                         \
    for (int64_t j = j0; j < j1; j++) {                                                       \
        float v = LOAD;                                                                       \
        up += v > hr;                                                                         \
        above_c[j] += v > hi_c[j];                                                            \
        uint8_t f = (uint8_t)((v >= lr) & (v <= hr)) | (uint8_t)(((v >= lo_c[j]) & (v <= hi_c[j])) << 1); \
        flags[j] = f;                                                                         \
        any |= f;                                                                             \
    }

/* keeps the pair (i, j) in `list`, the next of the tally[slot] pairs waiting there */
#define KEEP(list, slot, i, j)                                                                \
    do {                                                                                      \
        list[2 * tally[slot]] = (int32_t)(i);                                                 \
        list[2 * tally[slot] + 1] = (int32_t)(j);                                             \
        tally[slot]++;                                                                        \
    } while (0)

/* Counts the m × n entries of `tile` (bf16 or fp32, row stride ld), `width` columns at a time
   over all rows, from position `start` (column chunk · m + row). Returns m · chunks when done;
   −1 as soon as a direction holds more than max_band band entries; or, where the pairs waiting
   for exact scores could pass `capacity` in the next chunk, the position reached: the caller
   scores them, sets tally[0] and tally[1] to 0 and calls again from there. tally: pairs waiting
   per direction (rows, columns), then band entries per direction (the positives' own excluded). */
int64_t rank_scan(const void *tile, int32_t bf16, int64_t ld, int64_t m, int64_t n,
                  const float *lo_r, const float *hi_r, const float *lo_c, const float *hi_c,
                  const int64_t *own_r, const int64_t *own_c, const float *a, const float *b, int64_t d,
                  int32_t step, const float *pos_r, const float *pos_c, const float *norm_a,
                  const float *norm_b, float coef, int64_t *above_r, int64_t *above_c,
                  int32_t *undecided_r, int32_t *undecided_c, int64_t capacity, int64_t max_band,
                  int64_t *tally, uint8_t *flags, int64_t width, int64_t start) {
    int64_t total = m * ((n + width - 1) / width);
    for (int64_t p = start; p < total; p++) {
        int64_t i = p % m, j0 = (p / m) * width, j1 = j0 + width < n ? j0 + width : n;
        if (capacity - tally[0] < j1 - j0 || capacity - tally[1] < j1 - j0) return p;
        float lr = lo_r[i], hr = hi_r[i];
        int64_t up = 0;
        uint8_t any = 0;
        if (bf16) {
            const uint16_t *s = (const uint16_t *)tile + i * ld;
            COMPARE(from_bf16(s[j]))
        } else {
            const float *s = (const float *)tile + i * ld;
            COMPARE(s[j])
        }
        if (any) {
            const float *ai = a + i * d;
            float pr = pos_r[i], na = norm_a[i];
            for (int64_t j = j0; j < j1; j++) {
                uint64_t word = 0;  /* (eight flags at a time: most are 0) */
                if ((j - j0) % 8 == 0 && j + 8 <= j1 && (memcpy(&word, flags + j, 8), word == 0)) {
                    j += 7;
                    continue;
                }
                uint8_t f = flags[j];
                if (!f) continue;
                int row = (f & 1) && own_r[i] != j, col = (f & 2) && own_c[j] != i;
                tally[2] += row;
                tally[3] += col;
                if (!(row | col)) continue;
                if (!step) {
                    if (row) KEEP(undecided_r, 0, i, j);
                    if (col) KEEP(undecided_c, 1, i, j);
                    continue;
                }
                float s = dot(ai, b + j * d, d), e = coef * na * norm_b[j];
                if (row) {
                    if (s - e > pr) up++;
                    else if (s + e >= pr) KEEP(undecided_r, 0, i, j);
                }
                if (col) {
                    if (s - e > pos_c[j]) above_c[j]++;
                    else if (s + e >= pos_c[j]) KEEP(undecided_c, 1, i, j);
                }
            }
        }
        above_r[i] += up;
        if (tally[2] > max_band || tally[3] > max_band) return -1;
    }
    return total;
}

typedef float vec8f __attribute__((vector_size(32), aligned(4), may_alias));
typedef double vec8d __attribute__((vector_size(64)));

/* out[t] = a[rows[t]]·b[cols[t]] in fp64 (each product of two fp32 numbers is exact there), summed
   in one fixed order whatever the pair, rounded once to fp32 */
void exact_scores(const float *a, const float *b, int64_t d, const int64_t *rows, const int64_t *cols,
                  int64_t k, float *out) {
    for (int64_t t = 0; t < k; t++) {
        const float *x = a + rows[t] * d, *y = b + cols[t] * d;
        vec8d s0 = {0}, s1 = {0};
        int64_t i = 0;
        for (; i + 16 <= d; i += 16) {
            s0 += __builtin_convertvector(*(const vec8f *)(x + i), vec8d) *
                  __builtin_convertvector(*(const vec8f *)(y + i), vec8d);
            s1 += __builtin_convertvector(*(const vec8f *)(x + i + 8), vec8d) *
                  __builtin_convertvector(*(const vec8f *)(y + i + 8), vec8d);
        }
        vec8d v = s0 + s1;
        double s = ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
        for (; i < d; i++) s += (double)x[i] * (double)y[i];
        out[t] = (float)s;
    }
}

/* out[i, j] = (g1[i, j]·split + g2[i, j])·row_scale[i]·col_step[j] in fp32, in that order: the
   scores of an int8 tile from its two int32 GEMMs (g1, g2 contiguous [m, n], out row stride ldo) */
void widen(const int32_t *g1, const int32_t *g2, const float *row_scale, const float *col_step, float split,
           float *out, int64_t ldo, int64_t m, int64_t n) {
    for (int64_t i = 0; i < m; i++) {
        const int32_t *r1 = g1 + i * n, *r2 = g2 + i * n;
        float *o = out + i * ldo, rs = row_scale[i];
        for (int64_t j = 0; j < n; j++) o[j] = ((float)r1[j] * split + (float)r2[j]) * rs * col_step[j];
    }
}
"""

FLAGS = ("-O3", "-march=native", "-std=gnu11", "-fPIC", "-shared")
#: columns of a tile scanned per pass over its rows: the caption rows a pass scores band entries
#: against (SCAN_COLUMNS · d fp32, 512 KiB at d = 256) stay in a 1 MiB L2 cache (measured on a
#: 2048² bf16 tile at median rank 1% of N: 128 columns 3.6 ms, 256 2.8, 512 2.7, all 2048 3.0).
SCAN_COLUMNS = 512
#: undecided pairs a scan keeps per direction before it returns for them to be scored exactly
#: (it then goes on where it stopped): 512 KiB each.
SCAN_CAPACITY = 1 << 16

_P, _I = ctypes.c_void_p, ctypes.c_int64
_SCAN_ARGS = [_P, ctypes.c_int32, _I, _I, _I, _P, _P, _P, _P, _P, _P, _P, _P, _I, ctypes.c_int32, _P, _P, _P, _P,
              ctypes.c_float, _P, _P, _P, _P, _I, _I, _P, _P, _I, _I]
_EXACT_ARGS = [_P, _P, _I, _P, _P, _I, _P]
_WIDEN_ARGS = [_P, _P, _P, _P, ctypes.c_float, _P, _I, _I, _I]


def cache_dir() -> Path:
    """Where built native code is kept: $GEOMLAB_CACHE, else $XDG_CACHE_HOME/geomlab, else
    ~/.cache/geomlab."""
    if os.environ.get("GEOMLAB_CACHE"):
        return Path(os.environ["GEOMLAB_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "geomlab"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


class NativeKernels(NamedTuple):
    """The C functions of SOURCE, loaded: `scan` for `scan_tile`, `exact` for `exact_scores`,
    `widen` for `widen`."""
    scan: Callable
    exact: Callable
    widen: Callable


@functools.cache
def native_kernels() -> NativeKernels | None:
    """The NativeKernels from SOURCE, built on first use (once per machine) and loaded; None, with
    one RuntimeWarning, where they cannot be built or loaded."""
    cc = os.environ.get("CC") or "cc"
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60, check=True).stdout
        key = hashlib.sha256("\0".join([SOURCE, *FLAGS, version, _cpu_flags()]).encode()).hexdigest()[:20]
        lib = cache_dir() / f"ranking_native_{key}.so"
        if not lib.is_file():
            lib.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
                src, out = Path(tmp) / "ranking_native.c", Path(tmp) / lib.name
                src.write_text(SOURCE)
                proc = subprocess.run([cc, *FLAGS, str(src), "-o", str(out)], capture_output=True, text=True,
                                      timeout=300)
                if proc.returncode != 0:
                    raise RuntimeError(f"{cc} exited with {proc.returncode}: {proc.stderr.strip()[-500:]}")
                os.replace(out, lib)  # whole or absent: other processes may load it at any moment
        loaded = ctypes.CDLL(str(lib))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        warnings.warn(f"retrieval_ranks: its C kernels could not be built ({type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}); counting with torch, more slowly (set $CC to a "
                      f"C compiler, or $GEOMLAB_CACHE to a writable directory)", RuntimeWarning, stacklevel=2)
        return None
    kernels = []
    for name, argtypes in (("rank_scan", _SCAN_ARGS), ("exact_scores", _EXACT_ARGS), ("widen", _WIDEN_ARGS)):
        fn = getattr(loaded, name)
        fn.restype, fn.argtypes = (ctypes.c_int64 if name == "rank_scan" else None), argtypes
        kernels.append(fn)
    return NativeKernels(*kernels)


def exact_scores(kernels: NativeKernels, a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor,
                 cols: torch.Tensor) -> torch.Tensor:
    """a[rows[k]]·b[cols[k]] for every k (a [N, d], b [M, d] fp32; rows, cols int64), in fp64 and
    rounded once to fp32, like `ranking_torch._exact_scores` but in one fixed summation order: within
    one `retrieval_ranks` call every exact score comes from this one function, so identical vectors
    score identically."""
    rows, cols = rows.contiguous(), cols.contiguous()
    out = torch.empty(rows.numel())
    if rows.numel():
        if a.shape[1] != b.shape[1] or not (0 <= int(rows.min()) and int(rows.max()) < a.shape[0]
                                            and 0 <= int(cols.min()) and int(cols.max()) < b.shape[0]):
            raise ValueError(f"exact_scores: expected row indices of a {tuple(a.shape)} and b {tuple(b.shape)}, got "
                             f"rows in [{int(rows.min())}, {int(rows.max())}], cols in [{int(cols.min())}, "
                             f"{int(cols.max())}]")
        kernels.exact(_ptr(a, torch.float32), _ptr(b, torch.float32), a.shape[1], _ptr(rows, torch.int64),
                      _ptr(cols, torch.int64, rows.numel()), rows.numel(), out.data_ptr())
    return out


def widen(kernels: NativeKernels, split: float, g1: torch.Tensor, g2: torch.Tensor, row_scale: torch.Tensor,
          col_step: torch.Tensor, out: torch.Tensor) -> None:
    """out [m, n] (fp32, rows contiguous, any row stride) = (g1·split + g2)·row_scale[i]·col_step[j],
    from the int32 GEMM results g1, g2 (contiguous [m, n]): `ranking_torch._widen`'s fp32 operations
    in its order."""
    m, n = g1.shape
    if g2.shape != (m, n) or out.shape != (m, n) or out.dtype != torch.float32 or out.stride(1) != 1:
        raise ValueError(f"widen: expected int32 [m, n] GEMM results and an fp32 [m, n] tile with contiguous rows, "
                         f"got {tuple(g1.shape)}, {tuple(g2.shape)}, {out.dtype} {tuple(out.shape)}")
    kernels.widen(_ptr(g1, torch.int32), _ptr(g2, torch.int32), _ptr(row_scale, torch.float32, m),
                  _ptr(col_step, torch.float32, n), split, out.data_ptr(), out.stride(0), m, n)


class TileCounts(NamedTuple):
    """What `scan_tile` counted in a tile of m rows × n columns: per row and per column, the entries
    whose exact score beats its positive (int64 [m], [n]); the band entries of each direction, the
    positives' own excluded; and those of them scored exactly."""
    above_r: torch.Tensor
    above_c: torch.Tensor
    band_r: int
    band_c: int
    resolved_r: int
    resolved_c: int


def _ptr(x: torch.Tensor, dtype, length: int | None = None) -> int:
    """x's address, for C code that reads it as a contiguous CPU array of dtype (of `length`
    elements where given): anything else is a ValueError before C reads memory."""
    if (x.dtype != dtype or not x.is_contiguous() or x.device.type != "cpu"
            or (length is not None and x.numel() != length)):
        raise ValueError(f"ranking_native: expected a contiguous {dtype} CPU tensor"
                         f"{'' if length is None else f' of {length} elements'}, got {x.dtype} {tuple(x.shape)} "
                         f"on {x.device}")
    return x.data_ptr()


def scan_tile(kernels: NativeKernels, s, lo_r, hi_r, lo_c, hi_c, own_r, own_c, a, b, pos_r, pos_c, norm_a, norm_b,
              coef: float | None, max_band: float, beats) -> TileCounts | None:
    """Counts the tile s [m, n] (bf16 or fp32, rows contiguous, any row stride) with the C scan
    (`native_kernels`): rows against lo_r, hi_r [m], columns against lo_c, hi_c [n] (fp32; a
    bf16 band widened to fp32, which is exact); own_r [m] the tile column of each row's positive,
    own_c [n] the tile row of each column's, −1 where it lies outside (int64); a [m, d], b [n, d]
    the tile's fp32 image and caption rows; pos_r [m], pos_c [n] the positives' exact scores;
    norm_a, norm_b the rows' norms.

    With coef (the fp32 step: `_fp32_error` = coef·‖a‖‖b‖) each band entry is scored in fp32 and
    decided where that bound allows; without, none is. `beats(rows, cols, dim)` decides the rest
    from exact scores: 1 (int64) per tile entry (rows[k], cols[k]) that beats the positive of its
    row (dim 1) or column (dim 0), else 0; it is called whenever SCAN_CAPACITY pairs of a
    direction are waiting, and at the end. None where a direction's band holds more than max_band
    entries (the positives' own excluded): then nothing of the tile is counted anywhere."""
    m, n = s.shape
    d = a.shape[1]
    if s.dtype not in (torch.bfloat16, torch.float32) or s.stride(1) != 1 or a.shape != (m, d) or b.shape != (n, d):
        raise ValueError(f"scan_tile: expected a bf16 or fp32 tile with contiguous rows and [m, d], [n, d] rows, "
                         f"got {s.dtype} {tuple(s.shape)} (strides {s.stride()}), {tuple(a.shape)}, {tuple(b.shape)}")
    above_r, above_c = torch.zeros(m, dtype=torch.int64), torch.zeros(n, dtype=torch.int64)
    capacity = max(SCAN_CAPACITY, SCAN_COLUMNS)  # (a pass over a row's columns must always fit)
    waiting = torch.empty(2, capacity, 2, dtype=torch.int32)
    tally = torch.zeros(4, dtype=torch.int64)  # waiting pairs per direction, band entries per direction
    flags = torch.empty(n, dtype=torch.uint8)
    f32, i64 = torch.float32, torch.int64
    args = [s.data_ptr(), int(s.dtype == torch.bfloat16), s.stride(0), m, n, _ptr(lo_r, f32, m), _ptr(hi_r, f32, m),
            _ptr(lo_c, f32, n), _ptr(hi_c, f32, n), _ptr(own_r, i64, m), _ptr(own_c, i64, n), _ptr(a, f32),
            _ptr(b, f32), d, int(coef is not None), _ptr(pos_r, f32, m), _ptr(pos_c, f32, n), _ptr(norm_a, f32, m),
            _ptr(norm_b, f32, n),
            coef or 0.0, above_r.data_ptr(), above_c.data_ptr(), waiting[0].data_ptr(), waiting[1].data_ptr(),
            capacity, int(min(max_band, 1 << 62)), tally.data_ptr(), flags.data_ptr(), SCAN_COLUMNS]
    end, start, resolved = m * -(-n // SCAN_COLUMNS), 0, [0, 0]
    while start != end:
        start = kernels.scan(*args, start)
        if start < 0:
            return None
        for dim, counts, line in ((1, above_r, 0), (0, above_c, 1)):
            pairs = waiting[1 - dim, :int(tally[1 - dim])].long()
            if pairs.numel():
                counts.index_add_(0, pairs[:, line], beats(pairs[:, 0], pairs[:, 1], dim))
                resolved[1 - dim] += pairs.shape[0]
        tally[:2] = 0
    return TileCounts(above_r, above_c, int(tally[2]), int(tally[3]), *resolved)
