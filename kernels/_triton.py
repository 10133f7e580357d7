"""What the Triton kernels share: the interpreter switch, the autotuning space it selects, the
input checks, and the one dot-product tile every kernel is built on.

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

FEATURE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def configs(interpreter: dict, gpu: list[triton.Config]) -> list[triton.Config]:
    """The autotuning space: one fixed small configuration under the interpreter (it is slow, and
    timing it means nothing), `gpu` on the GPU."""
    if INTERPRET:
        return [triton.Config(interpreter, num_warps=1, num_stages=1)]
    return gpu


def check_features(*tensors: torch.Tensor) -> None:
    """The triton backend's inputs: CUDA tensors (any device under the interpreter) of a dtype its
    tiles take."""
    if not INTERPRET and not all(t.is_cuda for t in tensors):
        raise RuntimeError("the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 to run the "
                           "kernels on the CPU); use backend='torch' on the CPU")
    for t in tensors:
        if t.dtype not in FEATURE_DTYPES:
            raise TypeError(f"the triton backend takes float32, float16 or bfloat16 features, got "
                            f"{t.dtype}; use backend='torch' for {t.dtype} inputs")


@triton.jit
def dot_tile(a_ptr, b_ptr, rows, cols, rmask, cmask, K, stride_a, stride_b,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    """fp32 tile A[rows] · B[cols]ᵀ over the whole feature dimension K (rows/columns outside
    rmask/cmask and features ≥ K load as 0). IEEE: fp32 products in IEEE precision, never TF32."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        kmask = kk < K
        a = tl.load(a_ptr + rows[:, None].to(tl.int64) * stride_a + kk[None, :],
                    mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_ptr + cols[None, :].to(tl.int64) * stride_b + kk[:, None],
                    mask=cmask[None, :] & kmask[:, None], other=0.0)
        if UPCAST:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        elif IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    return acc
