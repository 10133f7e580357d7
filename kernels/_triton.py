"""What the Triton kernels share: the interpreter switch, the autotuning space it selects, the
argument checks, how work is split across programs, and the one dot-product tile every kernel is
built on.

Imported only by the triton backend's modules (losses_triton.py, ranking_triton.py), which
geomlab.kernels loads on first use of backend="triton".
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

#: TRITON_INTERPRET read as triton reads it: the kernels then run on the CPU, in numpy.
INTERPRET = os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "yes", "on", "y")
# Under the interpreter, tl.dot on bf16/fp16 tiles returns garbage (triton 3.x): upcast the tiles
# first (a 16-bit product is exact in fp32, and the GPU accumulates in fp32 too: the same numbers).
UPCAST = tl.constexpr(INTERPRET)
#: fp32 tiles: three TF32 tensor-core products (hi·hi + hi·lo + lo·hi), about fp32's accuracy at
#: tensor-core speed; "ieee" would run on the CUDA cores, plain "tf32" loses 13 bits of mantissa.
#: 16-bit tiles ignore it (their products are exact in the fp32 accumulator). The interpreter
#: computes every fp32 dot in IEEE fp32 whatever this says.
FP32_PRECISION = tl.constexpr("tf32x3")

FEATURE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: Split granularity: every block size of every configuration divides it, so a split boundary never
#: cuts a tile and the partial buffers' shapes do not depend on the configuration autotuning picks.
SPLIT_ALIGN = 32 if INTERPRET else 128


def configs(interpreter: dict, gpu: list[triton.Config]) -> list[triton.Config]:
    """The autotuning space: one fixed small configuration under the interpreter (it is slow, and
    timing it means nothing), `gpu` on the GPU."""
    if INTERPRET:
        return [triton.Config(interpreter, num_warps=1, num_stages=1)]
    return gpu


def size_class(n: int) -> int:
    """An autotuning key for a size: its power of two, so a new size in the same class reuses the
    tuned configuration instead of benchmarking every configuration again."""
    return triton.next_power_of_2(max(int(n), 1))


def target_programs(device: torch.device) -> int:
    """How many programs a launch should have to fill the device (4 per SM); 2 under the
    interpreter, so the small test shapes still run split launches and their merges."""
    if INTERPRET or device.type != "cuda":
        return 2
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def splits(n: int, n_other: int, programs: int) -> tuple[int, int]:
    """(count, size) of the splits of n items (rows or columns) such that n_other independent
    blocks times the splits make about `programs` programs; sizes are SPLIT_ALIGN multiples."""
    blocks = triton.cdiv(max(n, 1), SPLIT_ALIGN)
    want = max(1, min(blocks, triton.cdiv(programs, max(n_other, 1))))
    size = triton.cdiv(blocks, want) * SPLIT_ALIGN
    return triton.cdiv(max(n, 1), size), size


def check_inputs(features: dict[str, torch.Tensor], others: dict[str, torch.Tensor | None] | None = None) -> None:
    """The triton backend's tensor arguments: every one on the features' device, a CUDA device
    (any device under the interpreter), and features of a dtype the tiles take. `others` are the
    other tensor arguments (the logit scale); None entries are skipped."""
    named = {**features, **{k: v for k, v in (others or {}).items() if v is not None}}
    first_name, first = next(iter(features.items()))
    if not INTERPRET and not first.is_cuda:
        raise RuntimeError("the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 to run the "
                           "kernels on the CPU); use backend='torch' on the CPU")
    for name, t in named.items():
        if t.device != first.device:
            raise RuntimeError(f"the triton backend needs every tensor argument on one device: {name} on "
                               f"{t.device}, {first_name} on {first.device}")
    for t in features.values():
        if t.dtype not in FEATURE_DTYPES:
            raise TypeError(f"the triton backend takes float32, float16 or bfloat16 features, got "
                            f"{t.dtype}; use backend='torch' for {t.dtype} inputs")


@triton.jit
def dot_tile(a_ptr, b_ptr, rows, cols, rmask, cmask, K, stride_a, stride_b,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 tile A[rows] · B[cols]ᵀ over the whole feature dimension K (rows/columns outside
    rmask/cmask and features ≥ K load as 0). A and B have one dtype; fp32 in FP32_PRECISION."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    a_rows = a_ptr + rows[:, None].to(tl.int64) * stride_a
    b_cols = b_ptr + cols[None, :].to(tl.int64) * stride_b
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        kmask = kk < K
        a = tl.load(a_rows + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_cols + kk[:, None], mask=cmask[None, :] & kmask[:, None], other=0.0)
        if UPCAST:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc, input_precision=FP32_PRECISION)
    return acc
