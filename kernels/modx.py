"""Triton Mod-X loss (SPEC §5.1, §6): CE of s·S, LSE of S/τ and S'/τ, the old model's argmax row
mask and the KL cross term in one pass over tiles per direction, tiles recomputed in backward.
The kernels live in contrastive.py (they are the contrastive kernels with the KL terms switched
on); this module holds `ModxFunction` and the public entry points of the triton backend."""
from __future__ import annotations

from ._tiles import Losses
from .contrastive import RowLossFunction, _scale_tensor, direction_clip


class ModxFunction(RowLossFunction):
    """One direction of the Mod-X loss: (Σ_i ce_i, Σ_kept kl_i, kept)."""


def direction_modx(x, y, xo, yo, scale, row_offset, temperature, off_diag, want_ce, want_kl):
    return ModxFunction.apply(x, y, xo, yo, _scale_tensor(scale, x), int(row_offset),
                              1.0 / float(temperature), bool(off_diag), bool(want_ce), bool(want_kl))


TRITON = Losses(direction_modx, clip_direction=direction_clip)
