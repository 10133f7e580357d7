"""geomlab.kernels: similarity, CLIP loss and Mod-X loss without B×B matrices (SPEC §6).

Each public function takes backend = "auto" | "triton" | "torch" | "reference".
"""
from __future__ import annotations

import torch

from . import ranking, reference

BACKENDS = ("auto", "triton", "torch", "reference")


def _resolve(backend: str, *tensors: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        return "triton" if tensors[0].is_cuda else "torch"
    return backend


def _sim_fn(backend: str, name: str, tensor):
    """similarity/topk/retrieval_ranks of `backend`: auto = triton on CUDA, torch on CPU."""
    which = _resolve(backend, tensor)
    return getattr(reference, name) if which == "reference" else getattr(ranking, f"{name}_{which}")


def similarity(a, b, *, backend="auto"):
    """The fp32 cosine-similarity matrix a·bᵀ [N_a, N_b] (materialised: the caller asked for it)."""
    return _sim_fn(backend, "similarity", a)(a, b)


def _loss_impl(backend: str, *tensors):
    """The module implementing the losses for `backend`: every one exposes clip_loss, modx_kl,
    modx_kl_parts and modx_loss_parts with the same signatures (data-parallel keywords included)."""
    name = _resolve(backend, *tensors)
    if name == "reference":
        return reference
    if name == "torch":
        from . import _tiles
        return _tiles.TORCH
    from . import modx  # triton: imported lazily, it needs triton (CUDA, or TRITON_INTERPRET=1 on CPU)
    return modx.TRITON


def clip_loss(image, text, logit_scale, *, backend="auto", image_all=None, text_all=None, row_offset=0):
    """½ [CE(s·I Tᵀ) + CE(s·T Iᵀ)], open_clip's ClipLoss. Data-parallel: local rows `image`/`text`
    (rows row_offset.. of the full batch) against the gathered `image_all`/`text_all`, normalised so
    that the per-rank losses (and their gradients) sum to the full-batch loss."""
    return _loss_impl(backend, image).clip_loss(image, text, logit_scale, image_all=image_all,
                                                text_all=text_all, row_offset=row_offset)


def modx_kl(image, text, image_old, text_old, *, temperature=1.0, reduction="sum",
            off_diagonal_only=False, backend="auto", image_all=None, text_all=None,
            image_old_all=None, text_old_all=None, row_offset=0):
    """½ (KL_i2t + KL_t2i) of SPEC §5.1 (data-parallel keywords as for clip_loss)."""
    return _loss_impl(backend, image).modx_kl(
        image, text, image_old, text_old, temperature=temperature, reduction=reduction,
        off_diagonal_only=off_diagonal_only, image_all=image_all, text_all=text_all,
        image_old_all=image_old_all, text_old_all=text_old_all, row_offset=row_offset)


def modx_loss(image, text, image_old, text_old, logit_scale, *, alpha=20.0, temperature=1.0,
              reduction="sum", off_diagonal_only=False, backend="auto", image_all=None,
              text_all=None, image_old_all=None, text_old_all=None, row_offset=0):
    """(total, parts): total = clip + alpha·½(kl_i2t + kl_t2i); parts = clip, kl_i2t, kl_t2i,
    kept_i2t, kept_t2i (kept counts are local rows under data parallelism)."""
    clip, kl_i2t, kl_t2i, kept_i2t, kept_t2i = _loss_impl(backend, image).modx_loss_parts(
        image, text, image_old, text_old, logit_scale, temperature=temperature, reduction=reduction,
        off_diagonal_only=off_diagonal_only, image_all=image_all, text_all=text_all,
        image_old_all=image_old_all, text_old_all=text_old_all, row_offset=row_offset)
    total = clip + alpha * 0.5 * (kl_i2t + kl_t2i)
    return total, {"clip": clip, "kl_i2t": kl_i2t, "kl_t2i": kl_t2i,
                   "kept_i2t": kept_i2t, "kept_t2i": kept_t2i}


def topk(queries, gallery, k, *, backend="auto"):
    """(values [Nq, k] fp32, indices [Nq, k] int64): the k most similar gallery rows per query,
    ordered by (score desc, index asc), streamed over gallery tiles (no Nq×Ng matrix)."""
    return _sim_fn(backend, "topk", queries)(queries, gallery, k)


def retrieval_ranks(image, text, caption_image=None, *, backend="auto"):
    """(image→text ranks [N_img], text→image ranks [N_txt]), int64, 0-based, streamed: rank =
    #gallery items scoring higher than the positive + #equal ones with a smaller index. With
    `caption_image` (image row of each caption) an image's rank is its best caption's."""
    return _sim_fn(backend, "retrieval_ranks", image)(image, text, caption_image)
