"""LwF, Learning without Forgetting (Li & Hoiem 2017) for CLIP: the CLIP loss plus
λ·½(KL_i2t + KL_t2i) from the phase-start model's in-batch distribution to the current one, on
every row, at temperature T on logit-scaled similarities (ZSCL's distillation form;
docs/definitions.md, "LwF loss"). One fused kernel call: Mod-X's KL with every row kept."""
import torch

from geomlab import kernels

from .base import PhaseContext, Strategy


def distillation(temperature: float, logit_scale: torch.Tensor) -> dict:
    """The kernel options of a distillation at temperature T on logit-scaled similarities s·S/T:
    τ = T / s, every row kept, each direction's KL averaged over the batch's rows. s is the
    current model's logit scale, detached: ZSCL scores teacher and student with the trained
    model's one scale, and the distillation is not meant to train the scale (the kernel takes τ
    as a number)."""
    return {"temperature": temperature / float(logit_scale.detach()), "reduction": "mean", "selection": "all"}


class LwF(Strategy):
    name = "lwf"
    needs_previous_model = True
    knob = ("weight", +1)
    stores = "nothing (the phase-start model)"

    def __init__(self, context: PhaseContext, *, weight: float, temperature: float):
        super().__init__(context)
        self.old_model, self.weight, self.temperature = context.previous_model, weight, temperature

    def loss(self, images, tokens, feats, step):
        image_old, text_old, columns = self.context.teacher(self.old_model, images, tokens, feats)
        total, parts = kernels.modx_loss(feats.image, feats.text, image_old, text_old, feats.logit_scale,
                                         alpha=self.weight, **distillation(self.temperature, feats.logit_scale),
                                         **columns)
        return total, {key: parts[key] for key in ("clip", "kl_i2t", "kl_t2i")}
