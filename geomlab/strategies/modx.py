"""Mod-X (SPEC §5.1): CLIP loss plus the KL from the old model's in-batch similarity distribution,
on the rows the old model still retrieves correctly. The old model is the frozen snapshot taken at
the start of the phase."""
import torch

from geomlab import kernels

from .base import Strategy


class ModX(Strategy):
    name = "modx"
    needs_previous_model = True

    def __init__(self, ctx):
        super().__init__(ctx)
        self.old_model = ctx.previous_model()

    def loss(self, images, tokens, feats):
        with torch.no_grad():
            image_old, text_old = self.ctx.encode(self.old_model, images, tokens)
        o = self.ctx.options
        columns = feats.columns()
        if columns:
            columns.update(image_old_all=self.ctx.gather(image_old), text_old_all=self.ctx.gather(text_old))
        total, parts = kernels.modx_loss(
            feats.image, feats.text, image_old, text_old, feats.logit_scale,
            alpha=o["alpha"], temperature=o["temperature"], reduction=o["reduction"],
            off_diagonal_only=o["off_diagonal_only"], **columns, backend=self.ctx.kernel_backend)
        return total, parts
