"""Dense reference formulas (docs/definitions.md, "CLIP loss", "Mod-X loss", "Retrieval ranks and
ties"): plain torch, B×B matrices materialised.

These are the ground truth the tiled `torch` and fused `triton` backends are tested against.
Everything is computed in fp32 (inputs are upcast), except float64 inputs, which stay float64 (so
the tests can build a float64 ground truth).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .losses import ModxOptions, accumulation_dtype


def _acc(x: torch.Tensor) -> torch.Tensor:
    return x.to(accumulation_dtype(x))


def similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return _acc(a) @ _acc(b).T


def _global_batch(image, image_all, text_all, row_offset, olds=None):
    """None for a full-batch call (no data-parallel argument given), else the global batch size B
    of the gathered `image_all`/`text_all`, once the arguments are checked to agree."""
    if image_all is None and text_all is None and row_offset == 0 and (olds is None or olds == (None, None)):
        return None
    if image_all is None or text_all is None:
        raise ValueError("data-parallel use needs both image_all and text_all")
    B = image_all.shape[0]
    if text_all.shape[0] != B or not 0 <= row_offset <= B - image.shape[0]:
        raise ValueError("inconsistent data-parallel arguments")
    return B


def clip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale, *, image_all=None, text_all=None,
              row_offset: int = 0) -> torch.Tensor:
    """½ [CE(s·I Tᵀ, y) + CE(s·T Iᵀ, y)], open_clip's ClipLoss.

    Data-parallel: `image`/`text` are rows row_offset.. of the full batch, `image_all`/`text_all`
    the gathered full batch; the rows' cross-entropy is summed and divided by the global B, so the
    per-rank losses sum to the full-batch loss."""
    B = _global_batch(image, image_all, text_all, row_offset)
    if B is None:
        image_all, text_all, row_offset, B = image, text, 0, image.shape[0]
    labels = torch.arange(image.shape[0], device=image.device) + row_offset
    logits_i = logit_scale * similarity(image, text_all)
    logits_t = logit_scale * similarity(text, image_all)
    return 0.5 * (F.cross_entropy(logits_i, labels, reduction="sum")
                  + F.cross_entropy(logits_t, labels, reduction="sum")) / B


def _masked_kl_rows(s: torch.Tensor, s_old: torch.Tensor, options: ModxOptions, row_offset: int = 0):
    """Per-row KL(P' || P) of softmax(s_old/τ) against softmax(s/τ), and the row mask:
    argmax_j s_old[i, j] == row_offset + i (first index on ties) for selection "correct", every
    row for "all"."""
    n = s.shape[0]
    idx = torch.arange(n, device=s.device) + row_offset
    if options.selection == "all":
        mask = torch.ones(n, dtype=torch.bool, device=s.device)
    else:
        mask = s_old.argmax(dim=1) == idx  # torch.argmax returns the first maximal index
    x, x_old = s / options.temperature, s_old / options.temperature
    if options.off_diagonal_only:
        eye = torch.zeros(s.shape, dtype=torch.bool, device=s.device)
        eye[torch.arange(n, device=s.device), idx] = True
        x = x.masked_fill(eye, float("-inf"))
        x_old = x_old.masked_fill(eye, float("-inf"))
    logp = torch.log_softmax(x, dim=1)
    logp_old = torch.log_softmax(x_old, dim=1)
    p_old = logp_old.exp()
    terms = torch.where(p_old > 0, p_old * (logp_old - logp), torch.zeros_like(p_old))
    kl = terms.sum(dim=1)
    return torch.where(mask, kl, torch.zeros_like(kl)), mask


def _reduce(kl_rows: torch.Tensor, mask: torch.Tensor, reduction: str, n_rows=None, n_kept=None) -> torch.Tensor:
    n_rows = kl_rows.shape[0] if n_rows is None else n_rows
    n_kept = mask.sum() if n_kept is None else n_kept
    if reduction == "sum":
        return kl_rows.sum()
    if reduction == "mean":
        return kl_rows.sum() / n_rows
    return kl_rows.sum() / n_kept.clamp(min=1)  # kept_mean


def modx_kl_parts(image, text, image_old, text_old, options: ModxOptions = ModxOptions(), *, image_all=None,
                  text_all=None, image_old_all=None, text_old_all=None, row_offset=0):
    """(kl_i2t, kl_t2i, kept_i2t, kept_t2i) of the Mod-X loss.

    Data-parallel: local rows against the gathered columns (`*_all`); `mean` divides by the global
    B and `kept_mean` by the global kept count, so the per-rank values sum to the full-batch value;
    the kept counts returned are local."""
    reduction = options.reduction
    B = _global_batch(image, image_all, text_all, row_offset, (image_old_all, text_old_all))
    if B is None:
        s = similarity(image, text)
        s_old = similarity(image_old, text_old).detach()
        kl_i, mask_i = _masked_kl_rows(s, s_old, options)
        kl_t, mask_t = _masked_kl_rows(s.T, s_old.T, options)
        return (_reduce(kl_i, mask_i, reduction), _reduce(kl_t, mask_t, reduction),
                mask_i.sum(), mask_t.sum())
    if image_old_all is None or text_old_all is None:
        raise ValueError("data-parallel modx needs image_old_all and text_old_all")
    image_old_all, text_old_all = image_old_all.detach(), text_old_all.detach()
    kl_i, mask_i = _masked_kl_rows(similarity(image, text_all), similarity(image_old, text_old_all).detach(),
                                   options, row_offset)
    kl_t, mask_t = _masked_kl_rows(similarity(text, image_all), similarity(text_old, image_old_all).detach(),
                                   options, row_offset)
    s_all = similarity(image_old_all, text_old_all)
    ar = torch.arange(B, device=s_all.device)
    n_i, n_t = (s_all.argmax(1) == ar).sum(), (s_all.argmax(0) == ar).sum()
    if options.selection == "all":
        n_i = n_t = torch.tensor(B, device=s_all.device)
    return (_reduce(kl_i, mask_i, reduction, B, n_i), _reduce(kl_t, mask_t, reduction, B, n_t),
            mask_i.sum(), mask_t.sum())


def modx_loss_parts(image, text, image_old, text_old, logit_scale, options: ModxOptions = ModxOptions(), **dp):
    """(clip, kl_i2t, kl_t2i, kept_i2t, kept_t2i)."""
    clip = clip_loss(image, text, logit_scale, image_all=dp.get("image_all"), text_all=dp.get("text_all"),
                     row_offset=dp.get("row_offset", 0))
    return (clip, *modx_kl_parts(image, text, image_old, text_old, options, **dp))


def retrieval_ranks(image, text, caption_image=None):
    """0-based rank of each positive: (image→text ranks [N_images], text→image ranks [N_texts]).

    Rank = number of gallery items scoring strictly higher than the positive, plus those scoring
    equal with a smaller index (the order a stable descending sort gives). With several captions
    per image (`caption_image[c]` = image row of caption c), an image's rank is that of its best caption.
    """
    s = similarity(image, text)  # [N_img, N_txt]
    n_img, n_txt = s.shape
    if caption_image is None:
        if n_img != n_txt:
            raise ValueError("image and text must have the same number of rows without caption_image")
        caption_image = torch.arange(n_img, device=s.device)
    caption_image = caption_image.to(s.device)
    cols = torch.arange(n_txt, device=s.device)
    rows = torch.arange(n_img, device=s.device)
    # text→image: for caption c, positive image caption_image[c]
    st = s.T  # [N_txt, N_img]
    pos_t = st[cols, caption_image].unsqueeze(1)
    t2i = ((st > pos_t) | ((st == pos_t) & (rows.unsqueeze(0) < caption_image.unsqueeze(1)))).sum(1)
    # image→text: rank of each of its captions, best one kept
    pos_i = s[caption_image, cols]  # score of caption c with its own image
    per_caption = ((s[caption_image] > pos_i.unsqueeze(1)) |
                   ((s[caption_image] == pos_i.unsqueeze(1)) & (cols.unsqueeze(0) < cols.unsqueeze(1)))).sum(1)
    i2t = torch.full((n_img,), n_txt, dtype=torch.long, device=s.device)
    i2t = i2t.scatter_reduce(0, caption_image, per_caption, reduce="amin")
    return i2t, t2i


def topk(queries, gallery, k):
    return torch.topk(similarity(queries, gallery), k, dim=1)
