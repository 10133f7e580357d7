"""Mod-X: the CLIP loss plus α times the KL from the old model's in-batch similarity distribution,
on the rows the old model still retrieves correctly (docs/definitions.md, "Mod-X loss"). The old
model is the frozen copy of the phase-start model."""

from geomlab import kernels

from .base import PhaseContext, Strategy


class ModX(Strategy):
    name = "modx"
    needs_previous_model = True
    knob = ("alpha", +1)
    stores = "nothing (the phase-start model)"

    def __init__(self, context: PhaseContext, *, alpha: float, temperature: float, reduction: str,
                 off_diagonal_only: bool):
        super().__init__(context)
        self.old_model = context.previous_model
        self.alpha, self.temperature = alpha, temperature
        self.reduction, self.off_diagonal_only = reduction, off_diagonal_only

    def loss(self, images, tokens, feats, step):
        image_old, text_old, columns = self.context.teacher(self.old_model, images, tokens, feats)
        return kernels.modx_loss(
            feats.image, feats.text, image_old, text_old, feats.logit_scale,
            alpha=self.alpha, temperature=self.temperature, reduction=self.reduction,
            off_diagonal_only=self.off_diagonal_only, **columns)
