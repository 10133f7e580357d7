"""Triton Mod-X loss (SPEC §5.1, §6): CE of s·S, LSE of S/τ and S'/τ, the old model's argmax row
mask and the KL cross term in one pass over tiles per direction, tiles recomputed in backward.
The kernels live in contrastive.py (they are the contrastive kernels with the KL terms switched
on); this module holds `ModxFunction` and the public entry points of the triton backend."""
from __future__ import annotations

from ._tiles import loss_parts
from .contrastive import RowLossFunction, _scale_tensor, clip_loss  # noqa: F401  (clip_loss: backend API)


class ModxFunction(RowLossFunction):
    """One direction of the Mod-X loss: (Σ_i ce_i, Σ_kept kl_i, kept)."""


def direction_modx(x, y, xo, yo, scale, row_offset, temperature, off_diag, want_ce, want_kl):
    return ModxFunction.apply(x, y, xo, yo, _scale_tensor(scale, x), int(row_offset),
                              1.0 / float(temperature), bool(off_diag), bool(want_ce), bool(want_kl))


def modx_kl_parts(image, text, image_old, text_old, *, temperature=1.0, reduction="sum",
                  off_diagonal_only=False, **dp):
    _, kl_i, kl_t, k_i, k_t = loss_parts(
        direction_modx, image, text, image_old, text_old, None, want_ce=False, want_kl=True,
        temperature=temperature, reduction=reduction, off_diagonal_only=off_diagonal_only, **dp)
    return kl_i, kl_t, k_i, k_t


def modx_kl(image, text, image_old, text_old, *, temperature=1.0, reduction="sum",
            off_diagonal_only=False, **dp):
    kl_i, kl_t, _, _ = modx_kl_parts(image, text, image_old, text_old, temperature=temperature,
                                     reduction=reduction, off_diagonal_only=off_diagonal_only, **dp)
    return 0.5 * (kl_i + kl_t)


def modx_loss_parts(image, text, image_old, text_old, logit_scale, *, temperature=1.0,
                    reduction="sum", off_diagonal_only=False, **dp):
    """(clip, kl_i2t, kl_t2i, kept_i2t, kept_t2i): CE and KL from the same tiles, per direction."""
    return loss_parts(direction_modx, image, text, image_old, text_old, logit_scale, want_ce=True,
                      want_kl=True, temperature=temperature, reduction=reduction,
                      off_diagonal_only=off_diagonal_only, **dp)
