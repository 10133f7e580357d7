"""The counting scan of `retrieval_ranks`' CPU tiles in C: one pass over a tile that counts both
directions' entries surely above their positives and scores each band entry in fp32 on the spot
(docs/definitions.md, "Counting a tile").

Why C: a band entry needs a gathered dot product, which no fused torch operation expresses. In
torch the band is first decoded into index lists (several passes over them), then scored by a
compiled gather; about 65 ns per band entry on the 2-core development machine, against about 15
here, where each entry is scored while its tile row is in cache and its caption rows in L2 (the
tile is scanned SCAN_COLUMNS columns at a time).

The source below is built once per machine with the system C compiler (`$CC`, else `cc`; the one
torch.compile also needs) into a cache directory (`$GEOMLAB_CACHE`, else `~/.cache/geomlab`),
keyed by the source, the flags, the compiler and the CPU, and loaded with ctypes, whose calls
release the GIL: `retrieval_ranks`' worker threads scan tiles side by side. Where no compiler
works, `scan_function` warns once and returns None, and `retrieval_ranks` counts with torch.
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
from typing import NamedTuple

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

#define KEEP(list, slot, i, j) do { list[2 * tally[slot]] = (int32_t)(i); list[2 * tally[slot] + 1] = (int32_t)(j); tally[slot]++; } while (0)

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
_ARGTYPES = [_P, ctypes.c_int32, _I, _I, _I, _P, _P, _P, _P, _P, _P, _P, _P, _I, ctypes.c_int32, _P, _P, _P, _P,
             ctypes.c_float, _P, _P, _P, _P, _I, _I, _P, _P, _I, _I]


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


@functools.cache
def scan_function():
    """`rank_scan` from SOURCE, built on first use (once per machine) and loaded; None, with one
    RuntimeWarning, where it cannot be built or loaded."""
    cc = os.environ.get("CC") or "cc"
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60, check=True).stdout
        key = hashlib.sha256("\0".join([SOURCE, *FLAGS, version, _cpu_flags()]).encode()).hexdigest()[:20]
        lib = cache_dir() / f"rank_scan_{key}.so"
        if not lib.is_file():
            lib.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
                src, out = Path(tmp) / "rank_scan.c", Path(tmp) / lib.name
                src.write_text(SOURCE)
                proc = subprocess.run([cc, *FLAGS, str(src), "-o", str(out)], capture_output=True, text=True,
                                      timeout=300)
                if proc.returncode != 0:
                    raise RuntimeError(f"{cc} exited with {proc.returncode}: {proc.stderr.strip()[-500:]}")
                os.replace(out, lib)  # whole or absent: other processes may load it at any moment
        fn = ctypes.CDLL(str(lib)).rank_scan
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        warnings.warn(f"retrieval_ranks: its C tile scan could not be built ({type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}); counting with torch, more slowly",
                      RuntimeWarning, stacklevel=2)
        return None
    fn.restype, fn.argtypes = ctypes.c_int64, _ARGTYPES
    return fn


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


def _ptr(x: torch.Tensor, dtype) -> int:
    if x.dtype != dtype or not x.is_contiguous() or x.device.type != "cpu":
        raise ValueError(f"scan_tile: expected a contiguous {dtype} CPU tensor, got {x.dtype} {tuple(x.shape)} "
                         f"on {x.device}")
    return x.data_ptr()


def scan_tile(fn, s, lo_r, hi_r, lo_c, hi_c, own_r, own_c, a, b, pos_r, pos_c, norm_a, norm_b, coef: float | None,
              max_band: float, beats) -> TileCounts | None:
    """Counts the tile s [m, n] (bf16 or fp32, rows contiguous, any row stride) with the C scan
    `fn` (`scan_function`): rows against lo_r, hi_r [m], columns against lo_c, hi_c [n] (fp32; a
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
    args = [s.data_ptr(), int(s.dtype == torch.bfloat16), s.stride(0), m, n, _ptr(lo_r, f32), _ptr(hi_r, f32),
            _ptr(lo_c, f32), _ptr(hi_c, f32), _ptr(own_r, i64), _ptr(own_c, i64), _ptr(a, f32), _ptr(b, f32), d,
            int(coef is not None), _ptr(pos_r, f32), _ptr(pos_c, f32), _ptr(norm_a, f32), _ptr(norm_b, f32),
            coef or 0.0, above_r.data_ptr(), above_c.data_ptr(), waiting[0].data_ptr(), waiting[1].data_ptr(),
            capacity, int(min(max_band, 1 << 62)), tally.data_ptr(), flags.data_ptr(), SCAN_COLUMNS]
    end, start, resolved = m * -(-n // SCAN_COLUMNS), 0, [0, 0]
    while start != end:
        start = fn(*args, start)
        if start < 0:
            return None
        for dim, counts, line in ((1, above_r, 0), (0, above_c, 1)):
            pairs = waiting[1 - dim, :int(tally[1 - dim])].long()
            if pairs.numel():
                counts.index_add_(0, pairs[:, line], beats(pairs[:, 0], pairs[:, 1], dim))
                resolved[1 - dim] += pairs.shape[0]
        tally[:2] = 0
    return TileCounts(above_r, above_c, int(tally[2]), int(tally[3]), *resolved)
