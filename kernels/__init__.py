"""geomlab.kernels: similarity, CLIP loss and Mod-X loss without B×B matrices (docs/definitions.md,
"Kernels").

Each public function takes backend = "auto" | "triton" | "torch" | "reference": `auto` is triton
for CUDA tensors (torch for float64 ones, which triton does not take) and torch otherwise. One
module per op family and backend: losses*.py (CLIP and Mod-X), ranking*.py (similarity, top-k,
retrieval ranks), reference.py (the dense formulas), _triton.py (what the Triton kernels share).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

from .options import MODX_ALPHA, REDUCTIONS, SELECTIONS, ModxOptions

# The backends (and torch with them) are imported on first use, so that geomlab.config can read
# the Mod-X options without loading torch (a config error answers in a fraction of a second).

__all__ = ["clip_loss", "modx_kl", "modx_loss", "similarity", "topk", "retrieval_ranks",
           "ModxOptions", "MODX_ALPHA", "REDUCTIONS", "SELECTIONS", "BACKENDS"]


class Backend(NamedTuple):
    """The functions behind one backend name, with the same signatures in every backend (those of
    kernels.reference, data-parallel keywords included)."""

    similarity: Callable
    topk: Callable
    retrieval_ranks: Callable
    clip_loss: Callable
    modx_kl_parts: Callable
    modx_loss_parts: Callable


def _reference() -> Backend:
    from . import reference

    return Backend(reference.similarity, reference.topk, reference.retrieval_ranks, reference.clip_loss,
                   reference.modx_kl_parts, reference.modx_loss_parts)


def _torch() -> Backend:
    from . import losses_torch, ranking_torch

    losses = losses_torch.LOSSES
    return Backend(ranking_torch.similarity, ranking_torch.topk, ranking_torch.retrieval_ranks,
                   losses.clip_loss, losses.modx_kl_parts, losses.modx_loss_parts)


def _triton() -> Backend:
    # imported on first use: triton is slow to import, and its kernels run only on CUDA tensors
    # (or on the CPU with TRITON_INTERPRET=1 set before this import)
    from . import losses_triton, ranking_triton

    losses = losses_triton.LOSSES
    return Backend(ranking_triton.similarity, ranking_triton.topk, ranking_triton.retrieval_ranks,
                   losses.clip_loss, losses.modx_kl_parts, losses.modx_loss_parts)


#: backend name → the functions behind it ("auto" resolves to one of these).
IMPLEMENTATIONS: dict[str, Callable[[], Backend]] = {"triton": _triton, "torch": _torch, "reference": _reference}
BACKENDS = ("auto", *IMPLEMENTATIONS)


def _backend(backend: str, tensor: torch.Tensor) -> Backend:
    import torch

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        backend = "triton" if tensor.is_cuda and tensor.dtype != torch.float64 else "torch"
    return IMPLEMENTATIONS[backend]()


def similarity(a, b, *, backend="auto"):
    """The fp32 cosine-similarity matrix a·bᵀ [N_a, N_b] (materialised: the caller asked for it)."""
    return _backend(backend, a).similarity(a, b)


def clip_loss(image, text, logit_scale, *, backend="auto", image_all=None, text_all=None, row_offset=0):
    """½ [CE(s·I Tᵀ) + CE(s·T Iᵀ)], open_clip's ClipLoss. Data-parallel: local rows `image`/`text`
    (rows row_offset.. of the full batch) against the gathered `image_all`/`text_all`, normalised so
    that the per-rank losses (and their gradients) sum to the full-batch loss. float64 inputs give
    a float64 loss, all others an fp32 one."""
    return _backend(backend, image).clip_loss(image, text, logit_scale, image_all=image_all,
                                              text_all=text_all, row_offset=row_offset)


def modx_kl(image, text, image_old, text_old, *, temperature=ModxOptions.temperature,
            reduction=ModxOptions.reduction, off_diagonal_only=ModxOptions.off_diagonal_only,
            selection=ModxOptions.selection, backend="auto", image_all=None, text_all=None,
            image_old_all=None, text_old_all=None, row_offset=0):
    """½ (KL_i2t + KL_t2i) of the Mod-X loss (data-parallel keywords as for clip_loss);
    selection="all" keeps every row (the distillation of LwF and ZSCL)."""
    options = ModxOptions(temperature=temperature, reduction=reduction, off_diagonal_only=off_diagonal_only,
                          selection=selection)
    kl_i2t, kl_t2i, _, _ = _backend(backend, image).modx_kl_parts(
        image, text, image_old, text_old, options, image_all=image_all, text_all=text_all,
        image_old_all=image_old_all, text_old_all=text_old_all, row_offset=row_offset)
    return 0.5 * (kl_i2t + kl_t2i)


def modx_loss(image, text, image_old, text_old, logit_scale, *, alpha=MODX_ALPHA,
              temperature=ModxOptions.temperature, reduction=ModxOptions.reduction,
              off_diagonal_only=ModxOptions.off_diagonal_only, selection=ModxOptions.selection,
              backend="auto", image_all=None, text_all=None, image_old_all=None, text_old_all=None,
              row_offset=0):
    """(total, parts): total = clip + alpha·½(kl_i2t + kl_t2i); parts = clip, kl_i2t, kl_t2i,
    kept_i2t, kept_t2i (kept counts are local rows under data parallelism)."""
    options = ModxOptions(temperature=temperature, reduction=reduction, off_diagonal_only=off_diagonal_only,
                          selection=selection)
    clip, kl_i2t, kl_t2i, kept_i2t, kept_t2i = _backend(backend, image).modx_loss_parts(
        image, text, image_old, text_old, logit_scale, options, image_all=image_all, text_all=text_all,
        image_old_all=image_old_all, text_old_all=text_old_all, row_offset=row_offset)
    total = clip + alpha * 0.5 * (kl_i2t + kl_t2i)
    return total, {"clip": clip, "kl_i2t": kl_i2t, "kl_t2i": kl_t2i,
                   "kept_i2t": kept_i2t, "kept_t2i": kept_t2i}


def topk(queries, gallery, k, *, backend="auto"):
    """(values [Nq, k] fp32, indices [Nq, k] int64): the k most similar gallery rows per query,
    ordered by (score desc, index asc), streamed over gallery tiles (no Nq×Ng matrix)."""
    return _backend(backend, queries).topk(queries, gallery, k)


def retrieval_ranks(image, text, caption_image=None, *, backend="auto"):
    """(image→text ranks [N_img], text→image ranks [N_txt]), int64, 0-based, streamed: rank =
    #gallery items scoring higher than the positive + #equal ones with a smaller index. With
    `caption_image` (image row of each caption) an image's rank is its best caption's."""
    return _backend(backend, image).retrieval_ranks(image, text, caption_image)
