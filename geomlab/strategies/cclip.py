"""C-CLIP (Liu et al., ICLR 2025; docs/definitions.md, "C-CLIP"): LoRA merged per phase (lora.py)
plus contrastive knowledge consolidation (CKC) against the phase-start model, L = L_clip + λ·L_ckc.

CKC (the paper's Eq. 5): the current model's image and text features, each through a projector
h_ψ (an MLP of the embedding width, trained with the adapters and dropped at the phase end), and
the phase-start model's features of the same pairs are stacked into 2N rows each (the N images, then
the N captions), every row L2-normalised; row i of the current side and row i of the previous side
are the positives, the other 2N − 1 rows the negatives, in both directions, at temperature τ. At the
phase end the adapters are merged at the share α (the paper's Eq. 2: W ← W + α·ΔW, α = 0.5)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from geomlab import kernels

from .base import PhaseContext
from .lora import INIT_SALT, LoRA

PROJECTOR = "ckc_projector"  # the projector's name on the model during the phase (trained, saved, resumed with it)


def ckc_loss(current: torch.Tensor, previous: torch.Tensor, temperature: float) -> torch.Tensor:
    """½·mean_i [CE(row i of c·pᵀ/τ, i) + CE(row i of p·cᵀ/τ, i)] over the 2N rows of L2-normalised
    current (projected) and previous features, in float32."""
    logits = current.float() @ previous.float().T / temperature
    labels = torch.arange(len(logits), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


class CCLIP(LoRA):
    name = "cclip"
    needs_previous_model = True
    knob = ("weight", +1)
    stores = "nothing (the phase-start model; the adapters are merged at each phase end)"

    def __init__(self, context: PhaseContext, *, rank: int, scale: float, dropout: float, weight: float,
                 temperature: float, merge: float):
        super().__init__(context, rank=rank, scale=scale, dropout=dropout)
        self.weight, self.temperature, self.merge = weight, temperature, merge
        self.old_model = context.previous_model

    def start_phase(self, model):
        data = super().start_phase(model)
        width = model.text_projection.shape[1]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.context.seed * 1_000_003 + self.context.phase * INIT_SALT + 1)
            projector = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU(),
                                            torch.nn.Linear(width, width))
        # On the model: the optimizer, DistributedDataParallel and state.pt take it with the adapters
        model.add_module(PROJECTOR, projector.to(model.logit_scale.device))
        self.projector = projector
        return data

    def loss(self, images, tokens, feats, step):
        clip = kernels.clip_loss(feats.image, feats.text, feats.logit_scale, **feats.columns())
        with torch.no_grad():
            image_old, text_old = self.context.encode(self.old_model, images, tokens)
        gather = self.context.gather
        current = torch.cat([gather(F.normalize(self.projector(feats.image), dim=-1)),
                             gather(F.normalize(self.projector(feats.text), dim=-1))])
        previous = torch.cat([gather(image_old), gather(text_old)])
        ckc = ckc_loss(current, previous, self.temperature) / self.context.world  # every rank computes it in full
        return clip + self.weight * ckc, {"clip": clip, "ckc": ckc}

    def plain(self, model):
        if hasattr(model, PROJECTOR):
            delattr(model, PROJECTOR)
        return model

    def end_phase(self, model):
        self.plain(model)
        super().end_phase(model)
