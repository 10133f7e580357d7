"""ZSCL (Zheng et al. 2023; reference code: Thunderbeee/ZSCL, mtil/src/models/finetune.py): the CLIP
loss plus λ·½(KL_i2t + KL_t2i) distilled from the BASE model on external reference data, and the
weight ensemble (docs/definitions.md, "ZSCL loss").

The distillation scores the current model's image features of `reference_batch_size` reference
images against a fixed pool of reference texts embedded by the base model, and pulls both softmaxes
of that one matrix (each image over the pool; each pool text over the batch's reference images)
towards the base model's own (its image features of the same images × the same pool), at
temperature T on logit-scaled similarities, the scale being the base model's. The pool is embedded
once per phase start and kept on the device; the text encoder gets no gradient from the term.
λ = 8 (the default) is the reference code's strength: cross-entropy · T² per direction, both summed,
at T = 2 (2·T²·½(KL + KL), the teacher's entropy being a constant).

The reference images ride in the step's batch, after the phase's own rows: the current model embeds
both in one forward pass (a separate pass for a few rows costs a third of a step); the CLIP loss is
the phase rows' own. Weight ensemble: the running average of the phase-start weights, the weights
every `avg_freq` steps and the last ones becomes the phase's result (ZSCL's merge_we)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import ConcatDataset

from geomlab import kernels

from .base import PhaseContext, Strategy

REFERENCE_ORDER = 1  # context.order stream of the reference rows
POOL_BATCH = 256     # pool texts per forward pass of the base model's text encoder


def distillation(image: torch.Tensor, image_base: torch.Tensor, pool: torch.Tensor, scale: float,
                 temperature: float, image_all: torch.Tensor | None = None,
                 image_base_all: torch.Tensor | None = None, world: int = 1):
    """This rank's share of ½(KL_i2t + KL_t2i) and of each KL, in float32 (docs/definitions.md,
    "ZSCL loss"). Logits Z = (s/T)·u·tᵀ of reference image features u against the pool t [P, D]
    (the current model's: `image`; the base model's: `image_base`, the teacher). KL_i2t: each
    reference image's softmax over the pool, KL(teacher ‖ current), averaged over the R reference
    images (this rank's rows [r, D]: its share); KL_t2i: each pool text's softmax over the R
    reference images (`image_all`, `image_base_all`: every rank's [R, D]; None on one process),
    averaged over the P texts, computed in full on every rank and divided by `world`."""
    if image_all is None:
        image_all, image_base_all = image, image_base
    t, pool = scale / temperature, pool.float()

    def kl(student, teacher):  # Σ over rows of KL(softmax(teacher) ‖ softmax(student))
        log_p = F.log_softmax(teacher, dim=1)
        return (log_p.exp() * (log_p - F.log_softmax(student, dim=1))).sum()

    i2t = kl(t * image.float() @ pool.T, t * image_base.float() @ pool.T) / image_all.shape[0]
    t2i = kl(t * pool @ image_all.float().T, t * pool @ image_base_all.float().T) / (pool.shape[0] * world)
    return 0.5 * (i2t + t2i), i2t, t2i


class ZSCL(Strategy):
    name = "zscl"
    needs_base_model = True
    knob = ("weight", +1)
    stores = "external data: reference images (ShapeWorld: 1,000) and a text pool (2,000 captions)"

    def __init__(self, context: PhaseContext, *, weight: float, temperature: float, avg_freq: int,
                 reference_batch_size: int):
        super().__init__(context)
        if reference_batch_size % context.world:
            raise ValueError(f"zscl.reference_batch_size ({reference_batch_size}) must be a multiple of the "
                             f"number of processes ({context.world})")
        self.base_model, self.reference = context.base_model, context.stream.reference
        self.weight, self.temperature = weight, temperature
        self.avg_freq, self.reference_batch_size = avg_freq, reference_batch_size
        # ZSCL's scale is its model's logit scale, which it never trains: the pre-trained (here: base) one
        self.scale = float(self.base_model.logit_scale.detach().exp())

    @classmethod
    def check_stream(cls, stream):
        if stream.reference is None or len(stream.reference) == 0:
            raise ValueError("zscl needs a reference set: data.shapes.reference_size > 0 (ShapeWorld) or a "
                             "[[data.sources]] table with role = \"reference\"")
        if not stream.reference_texts:
            raise ValueError("zscl needs a reference text pool: data.shapes.reference_texts > 0 (ShapeWorld) or "
                             "captions in the role = \"reference\" sources")

    @torch.no_grad()
    def embed_pool(self) -> torch.Tensor:
        """[P, D] the base model's L2-normalised embeddings of the reference texts, on its device."""
        texts, model = self.context.stream.reference_texts, self.base_model
        device = next(model.parameters()).device
        return torch.cat([F.normalize(model.encode_text(self.context.tokenizer(texts[i:i + POOL_BATCH]).to(device)),
                                      dim=-1) for i in range(0, len(texts), POOL_BATCH)])

    def start_phase(self, model):
        self.pool = self.embed_pool()
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
        B, R = self.context.batch_size, self.reference_batch_size
        new = feats.rows(0, B)
        # a rank holding reference rows only (many ranks): a zero that still reaches its text features,
        # the gathered columns and the logit scale, so that every rank's backward runs the same
        # collectives and reduces every parameter (DDP)
        clip = (0.0 * (feats.text_all.float().sum() + feats.logit_scale.float().sum()) if new is None
                else kernels.clip_loss(new.image, new.text, new.logit_scale, **new.columns()))
        local = slice(max(B - feats.row_offset, 0), None)  # this rank's reference rows: the batch's last
        base_local, base_all = self.teacher(images, local)
        distill, _, _ = distillation(feats.image[local], base_local, self.pool, self.scale, self.temperature,
                                     *((feats.image_all[B:B + R], base_all) if feats.distributed else ()),
                                     world=self.context.world)
        return clip + self.weight * distill, {"clip": clip, "distill": distill}

    @torch.no_grad()
    def teacher(self, images, local):
        """The base model's image features of this rank's reference rows and, under torchrun, of
        every rank's (None on one process): the teacher then embeds all of the rank's rows, so that
        every rank gathers as many, whatever its share of reference rows."""
        encode = lambda x: F.normalize(self.base_model.encode_image(x), dim=-1)  # noqa: E731
        if self.context.world == 1:
            return encode(images[local]), None
        B, R = self.context.batch_size, self.reference_batch_size
        image = encode(images)
        return image[local], self.context.gather(image)[B:B + R]

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
