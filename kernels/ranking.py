"""Similarity, streamed top-k and streamed retrieval ranks: the conventions and argument checks
both backends share (docs/definitions.md, "Retrieval ranks and ties"; "Kernels").

Two backends, each with the same memory property (no N×N matrix, only tiles):

* ranking_triton.py: Triton kernels (Liger-Kernel style: ``@triton.jit`` kernels + plain
  launchers). Autotuned block sizes on the GPU, one fixed configuration under ``TRITON_INTERPRET=1``.
* ranking_torch.py: the same tiling in plain torch (the CPU path).

Conventions shared by every backend (and by ``reference`` up to ties):

* Inputs are fp32/bf16/fp16 features; every score is accumulated in fp32 (fp32 tiles on the GPU use
  ``input_precision="tf32x3"``: tensor cores with an error close to IEEE fp32).
* ``topk`` returns the k best gallery items per query ordered by (score descending, index
  ascending): among equal scores the smaller gallery index wins. ``reference.topk`` (dense
  ``torch.topk``) has the same values but may order tied indices differently.
* ``retrieval_ranks``: rank = #gallery items scoring strictly higher than the positive + #items
  scoring equal with a smaller index. Each backend compares scores of one arithmetic (so a
  duplicate of the positive ties it): triton computes the positive's score first with the same
  GEMM arithmetic as the tiles; torch decides every comparison the tiles leave open with exact
  scores (fp64 dot products rounded once to fp32, the positives' included). The positive itself
  is never counted against itself. With several captions per image (``caption_image[c]`` = image
  row of caption c) an image's rank is that of its best caption (the best caption is the one with the highest score, smallest index on ties,
  which is exactly the caption of minimum rank); the text→image rank is that of the caption's image.
"""
from __future__ import annotations

import torch


def check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    """a and b: 2-D feature matrices with the same feature dimension, on the same device, every
    entry finite: with NaN every "score > positive" comparison is false, so every positive would
    rank first (one sum over each input; on a GPU it waits for them)."""
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"expected 2-D feature matrices, got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    if a.device != b.device:
        raise ValueError(f"inputs on different devices: {a.device} vs {b.device}")
    for which, x in (("first (queries, image)", a), ("second (gallery, text)", b)):
        if bool(torch.isfinite(x.sum())):  # a finite sum proves every entry finite: one cheap reduction
            continue
        bad = int((~torch.isfinite(x).all(1)).sum())  # (an overflowing sum of finite entries gets here too)
        if bad:
            raise ValueError(f"{bad} of {x.shape[0]} rows of the {which} input are not finite (NaN or inf): "
                             "scores and ranks would be meaningless")


def caption_image_rows(caption_image, n_img: int, n_txt: int, device) -> torch.Tensor:
    """The image row of every caption, checked: `caption_image` as int64, or 0..N-1 without it."""
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


def best_caption(pos: torch.Tensor, ci: torch.Tensor, n_img: int):
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
