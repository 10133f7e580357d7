"""The CLIP and Mod-X losses, backend-independent part: the Mod-X options, argument checks, the
data-parallel convention, normalisation and reductions (docs/definitions.md, "CLIP loss",
"Mod-X loss").

A backend computes the loss of one *direction* (image→text or text→image): local rows X (b×d)
against columns Y (B×d), the positive of row i at column row_offset + i,

  ce_i   = LSE_j(s·S_ij) − s·S_i,diag                                    (cross-entropy)
  kl_i   = mask_i · Σ_j P'_ij (log P'_ij − log P_ij),  P = softmax(S/τ), P' = softmax(S'/τ)
  mask_i = [argmax_j S'_ij == diag]  (first index on ties; selection "correct", Mod-X)
  mask_i = 1                                          (selection "all", LwF and ZSCL)

with S = X Yᵀ and S' = X' Y'ᵀ (the old model), and returns (Σ_i ce_i, Σ_i kl_i, kept). `RowLosses`
turns two direction calls (or one call of a fused both-directions function) into the public
quantities: losses_torch.py and losses_triton.py each build one.

Dtypes: float64 inputs are computed in float64, everything else (fp32, bf16, fp16) in fp32; the
results come back in that accumulation dtype.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .options import ModxOptions

#: elements of one R×B tile buffer of the torch-side tiles (16 MiB in fp32): R must be large for
#: the GEMMs to run at full speed.
TILE_ELEMS = 1 << 22


def kl_switches(options: ModxOptions | None) -> tuple[bool, float, bool]:
    """(want_kl, 1/τ, off_diagonal_only) as the kernels take them; (False, 1.0, False): no KL term."""
    if options is None:
        return False, 1.0, False
    return True, 1.0 / float(options.temperature), bool(options.off_diagonal_only)


def accumulation_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (half-precision inputs accumulate in fp32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def tile_rows(n_rows: int, n_cols: int) -> int:
    """Rows R of an R×n_cols tile of about TILE_ELEMS elements (at least 16, at most n_rows)."""
    r = max(16, TILE_ELEMS // max(n_cols, 1))
    return max(1, min(n_rows, r))


@torch.no_grad()
def _row_argmax_kept(x_old: torch.Tensor, y_old: torch.Tensor) -> torch.Tensor:
    """Number of rows i of X'·Y'ᵀ whose argmax is i (first index on ties), tiled."""
    b, B = x_old.shape[0], y_old.shape[0]
    acc = accumulation_dtype(x_old, y_old)
    yf = y_old.to(acc)
    R = tile_rows(b, B)
    kept = torch.zeros((), dtype=torch.long, device=x_old.device)
    for r0 in range(0, b, R):
        r1 = min(b, r0 + R)
        am = (x_old[r0:r1].to(acc) @ yf.T).argmax(1)
        kept += (am == torch.arange(r0, r1, device=x_old.device)).sum()
    return kept


def _scale_tensor(scale, like: torch.Tensor) -> torch.Tensor:
    """logit_scale as a tensor (1 when there is no cross-entropy term)."""
    if scale is None:
        return torch.ones((), device=like.device)
    if not torch.is_tensor(scale):
        return torch.tensor(float(scale), device=like.device)
    return scale


def _check_dp(image, text, image_all, text_all, row_offset, olds=()):
    b = image.shape[0]
    if text.shape[0] != b:
        raise ValueError(f"image and text must have the same number of rows, got {b} and {text.shape[0]}")
    if image_all is None or text_all is None:
        raise ValueError("data-parallel use needs both image_all and text_all")
    B = image_all.shape[0]
    if text_all.shape[0] != B:
        raise ValueError("image_all and text_all must have the same number of rows")
    if not 0 <= row_offset <= B - b:
        raise ValueError(f"row_offset={row_offset} with {b} local rows is outside the {B} gathered rows")
    for o in olds:
        if o is not None and o.shape[0] != B:
            raise ValueError("image_old_all/text_old_all must have as many rows as image_all")
    return B


def loss_parts(direction, fused, image, text, image_old, text_old, logit_scale, *, want_ce: bool,
               options: ModxOptions | None, image_all=None, text_all=None, image_old_all=None,
               text_old_all=None, row_offset=0):
    """(clip, kl_i2t, kl_t2i, kept_i2t, kept_t2i) from two calls of `direction` (or, for the full
    batch, one call of `fused` when the backend has it); `options` None: no KL term (the KL parts
    are None).

    Local rows `image`/`text` (rows row_offset.. of the full batch) against gathered columns
    `*_all`; each result is normalised by the global batch (and, for kept_mean, the global kept
    count) so that the sum over ranks is the full-batch loss. kept counts are local.
    """
    want_kl = options is not None
    dp = any(t is not None for t in (image_all, text_all, image_old_all, text_old_all)) or row_offset != 0
    if dp:
        B = _check_dp(image, text, image_all, text_all, row_offset,
                      (image_old_all, text_old_all) if want_kl else ())
        if want_kl and (image_old_all is None or text_old_all is None):
            raise ValueError("data-parallel modx needs image_old_all and text_old_all")
    else:
        if image.shape[0] != text.shape[0]:
            raise ValueError(f"image and text must have the same number of rows, "
                             f"got {image.shape[0]} and {text.shape[0]}")
        image_all, text_all, image_old_all, text_old_all, row_offset = image, text, image_old, text_old, 0
        B = image.shape[0]
    scale = _scale_tensor(logit_scale, image)
    if want_kl:
        image_old, text_old = image_old.detach(), text_old.detach()
        image_old_all, text_old_all = image_old_all.detach(), text_old_all.detach()
        if options.off_diagonal_only and B == 1:  # no entry j ≠ i: an empty softmax, KL = 0 (as reference)
            clip = None
            if want_ce:
                clip, *_ = loss_parts(direction, fused, image, text, None, None, scale, want_ce=True,
                                      options=None, image_all=image_all if dp else None,
                                      text_all=text_all if dp else None, row_offset=row_offset)
            kept = torch.ones((), dtype=torch.long, device=image.device) * image.shape[0]
            zero = torch.zeros((), dtype=accumulation_dtype(image, text), device=image.device)
            return clip, zero, zero.clone(), kept, kept.clone()
    if not dp and fused is not None:
        ce_i, ce_t, kl_i, kl_t, k_i, k_t = fused(image, text, image_old, text_old, scale, options, want_ce)
    else:
        ce_i, kl_i, k_i = direction(image, text_all, image_old, text_old_all, scale, row_offset, options, want_ce)
        ce_t, kl_t, k_t = direction(text, image_all, text_old, image_old_all, scale, row_offset, options, want_ce)
    clip = 0.5 * (ce_i + ce_t) / B if want_ce else None
    if not want_kl:
        return clip, None, None, None, None
    if options.reduction == "mean":
        kl_i, kl_t = kl_i / B, kl_t / B
    elif options.reduction == "kept_mean":
        if options.selection == "all":
            n_i = n_t = torch.tensor(B, device=image.device)
        elif dp:
            n_i = _row_argmax_kept(image_old_all, text_old_all)
            n_t = _row_argmax_kept(text_old_all, image_old_all)
        else:
            n_i, n_t = k_i, k_t
        kl_i = kl_i / n_i.clamp(min=1).to(kl_i.dtype)
        kl_t = kl_t / n_t.clamp(min=1).to(kl_t.dtype)
    return clip, kl_i, kl_t, k_i, k_t


@dataclass(frozen=True)
class RowLosses:
    """clip_loss, modx_kl_parts and modx_loss_parts of one backend (the signatures of
    kernels.reference), over its `direction` function

        direction(x, y, x_old, y_old, scale, row_offset, options, want_ce) → (Σ ce_i, Σ kl_i, kept)

    and, when it has one, a `fused` function doing both directions of a full batch at once,

        fused(image, text, image_old, text_old, scale, options, want_ce)
            → (Σ ce_i2t, Σ ce_t2i, Σ kl_i2t, Σ kl_t2i, kept_i2t, kept_t2i)

    (`options` None: no KL term; `scale` is a tensor)."""

    direction: Callable
    fused: Callable | None = None

    def clip_loss(self, image, text, logit_scale, *, image_all=None, text_all=None, row_offset=0):
        clip, *_ = loss_parts(self.direction, self.fused, image, text, None, None, logit_scale,
                              want_ce=True, options=None, image_all=image_all, text_all=text_all,
                              row_offset=row_offset)
        return clip

    def modx_kl_parts(self, image, text, image_old, text_old, options: ModxOptions, **data_parallel):
        """(kl_i2t, kl_t2i, kept_i2t, kept_t2i)."""
        _, *parts = loss_parts(self.direction, self.fused, image, text, image_old, text_old, None,
                               want_ce=False, options=options, **data_parallel)
        return tuple(parts)

    def modx_loss_parts(self, image, text, image_old, text_old, logit_scale, options: ModxOptions,
                        **data_parallel):
        """(clip, kl_i2t, kl_t2i, kept_i2t, kept_t2i), CE and KL from the same tiles."""
        return loss_parts(self.direction, self.fused, image, text, image_old, text_old, logit_scale,
                          want_ce=True, options=options, **data_parallel)
