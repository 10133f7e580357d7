"""ZSCL (Zheng et al. 2023): the CLIP loss plus λ·½(KL_i2t + KL_t2i) from the BASE model's in-batch
distribution on a batch of reference pairs (held out from every phase and probe set) to the
current model's, every row kept, temperature T on logit-scaled similarities (as LwF); and the
weight ensemble: the running average of the phase-start weights, the weights every `avg_freq`
steps and the last ones becomes the phase's result (docs/definitions.md, "ZSCL loss")."""
from __future__ import annotations

import torch

from geomlab import kernels

from .base import PhaseContext, Strategy
from .lwf import distillation

REFERENCE_ORDER = 1  # context.order stream of the reference batches


class ZSCL(Strategy):
    name = "zscl"
    needs_base_model = True

    def __init__(self, context: PhaseContext, *, weight: float, temperature: float, avg_freq: int,
                 reference_batch_size: int):
        super().__init__(context)
        if reference_batch_size % context.world:
            raise ValueError(f"zscl.reference_batch_size ({reference_batch_size}) must be a multiple of the "
                             f"number of processes ({context.world})")
        self.base_model, self.reference = context.base_model, context.stream.reference
        self.weight, self.temperature = weight, temperature
        self.avg_freq, self.reference_batch_size = avg_freq, reference_batch_size

    @classmethod
    def check_stream(cls, stream):
        if stream.reference is None or len(stream.reference) == 0:
            raise ValueError("zscl needs a reference set: data.shapes.reference_size > 0 (ShapeWorld) or a "
                             "[[data.sources]] table with role = \"reference\"")

    def start_phase(self, model):
        self.model = model  # the reference batches go through the current model too
        self.average = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}
        self.averaged = 1  # weights in the average: the phase-start ones
        self.holds_current = True  # the average includes the model's weights as they are now
        return super().start_phase(model)

    def reference_rows(self, step: int) -> list[int]:
        """This rank's rows of step's reference batch."""
        rows = self.context.order(len(self.reference), self.reference_batch_size, step, REFERENCE_ORDER)
        per = self.reference_batch_size // self.context.world
        return rows[self.context.rank * per: (self.context.rank + 1) * per]

    def loss(self, images, tokens, feats, step):
        clip = kernels.clip_loss(feats.image, feats.text, feats.logit_scale, **feats.columns())
        ref_images, ref_tokens = self.context.load_batch(self.reference, self.reference_rows(step))
        image, text = self.context.encode(self.model, ref_images, ref_tokens)
        with torch.no_grad():
            image_base, text_base = self.context.encode(self.base_model, ref_images, ref_tokens)
        columns = {}
        if self.context.world > 1:
            gather = self.context.gather
            columns = dict(image_all=gather(image), text_all=gather(text), image_old_all=gather(image_base),
                           text_old_all=gather(text_base), row_offset=self.context.rank * image.shape[0])
        kl = kernels.modx_kl(image, text, image_base, text_base, **distillation(self.temperature, feats.logit_scale),
                             **columns)
        return clip + self.weight * kl, {"clip": clip, "distill": kl}

    @torch.no_grad()
    def fold(self, model):
        """Add the model's weights to the running average (ZSCL's merge_we)."""
        self.averaged += 1
        for key, value in model.state_dict().items():
            if key in self.average:
                self.average[key] += (value - self.average[key]) / self.averaged

    def after_step(self, model, done):
        self.holds_current = done % self.avg_freq == 0
        if self.holds_current:
            self.fold(model)

    @torch.no_grad()
    def end_phase(self, model):
        if not self.holds_current:  # the last step's weights, when it was not an avg_freq-th step
            self.fold(model)
        for key, value in model.state_dict().items():
            if key in self.average:
                value.copy_(self.average[key])

    def state_dict(self):
        return {"average": self.average, "averaged": self.averaged}

    @torch.no_grad()
    def load_state_dict(self, state):
        if state:
            for key, value in state["average"].items():
                self.average[key].copy_(value)
            self.averaged = int(state["averaged"])
