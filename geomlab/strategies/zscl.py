"""ZSCL (Zheng et al. 2023): the CLIP loss plus λ·½(KL_i2t + KL_t2i) from the BASE model's in-batch
distribution on a batch of reference pairs (held out from every phase and probe set) to the
current model's, every row kept, temperature T on logit-scaled similarities (as LwF); and the
weight ensemble: the running average of the phase-start weights, the weights every `avg_freq`
steps and the last ones becomes the phase's result (docs/definitions.md, "ZSCL loss").

The reference pairs ride in the step's batch, after the phase's own rows: the current model embeds
both in one forward pass (a separate pass for a few rows costs a third of a step), the CLIP loss
is the phase rows' own, and the distillation the reference rows'."""
from __future__ import annotations

import torch
from torch.utils.data import ConcatDataset

from geomlab import kernels

from .base import PhaseContext, Strategy
from .lwf import distillation

REFERENCE_ORDER = 1  # context.order stream of the reference rows


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
        self.average = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}
        self.averaged = 1  # weights in the average: the phase-start ones
        self.holds_current = True  # the average includes the model's weights as they are now
        return ConcatDataset([self.context.data, self.reference])

    def step_indices(self, step):
        """The phase's own batch, then `reference_batch_size` reference pairs in an order of their own."""
        n = len(self.context.data)
        rows = self.context.order(len(self.reference), self.reference_batch_size, step, REFERENCE_ORDER)
        return super().step_indices(step) + [n + r for r in rows]

    def loss(self, images, tokens, feats, step):
        B = self.context.batch_size
        new, ref = feats.rows(0, B), feats.rows(B, B + self.reference_batch_size)
        zero = feats.image.new_zeros((), dtype=torch.float32)
        clip = zero if new is None else kernels.clip_loss(new.image, new.text, new.logit_scale, **new.columns())
        base_image, base_text, columns = self.teacher(images, tokens, feats)
        kl = zero if ref is None else kernels.modx_kl(
            ref.image, ref.text, base_image, base_text, **distillation(self.temperature, feats.logit_scale),
            **ref.columns(), **columns)
        return clip + self.weight * kl, {"clip": clip, "distill": kl}

    @torch.no_grad()
    def teacher(self, images, tokens, feats):
        """The base model's features of this rank's reference rows, and under torchrun the
        gathered reference columns (the teacher then embeds all of the rank's rows, so that every
        rank gathers as many, whatever its share of reference rows)."""
        B, R = self.context.batch_size, self.reference_batch_size
        if self.context.world == 1:
            return *self.context.encode(self.base_model, images[B:], tokens[B:]), {}
        image, text = self.context.encode(self.base_model, images, tokens)
        image_all, text_all = self.context.gather(image), self.context.gather(text)
        local = slice(max(B - feats.row_offset, 0), None)  # the reference rows are the batch's last
        return image[local], text[local], {"image_old_all": image_all[B:B + R], "text_old_all": text_all[B:B + R]}

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
