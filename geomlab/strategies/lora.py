"""LoRA merged per phase (the low-rank half of C-CLIP, Liu et al. ICLR 2025; docs/definitions.md,
"LoRA merged per phase"): each phase trains fresh rank-r adapters ΔW = scale·B·A on the attention
and MLP projections of both towers, built with peft; only the adapters and the logit scale train.
At the phase end the adapters are merged into the weights (W ← W + merge·scale·B·A), so the next
phase and every checkpoint are plain open_clip models.

open_clip's attention is nn.MultiheadAttention, whose query, key and value projections are one
fused parameter (in_proj_weight, 3d × d): the adapter of that module (peft's MultiheadAttention
layer) is one rank-r pair on the fused matrix, a low-rank update of q, k and v together, plus one
on out_proj. A per-q/k/v adapter would need the parameter split, i.e. another attention module
than open_clip's, whose checkpoints would no longer be open_clip's."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

from .base import PhaseContext, Strategy

# Both towers' residual blocks: the attention module (fused in_proj and out_proj) and the MLP
TARGETS = r".*resblocks\.\d+\.(attn|mlp\.c_fc|mlp\.c_proj)$"
INIT_SALT = 7_919  # the adapters' initial A: seeded by the run's seed and the phase alone


def import_peft():
    """peft, with transformers (which peft imports) finding the PyPI distribution `kernels` it
    imports, not a geomlab checkout's kernels/ folder (installed as geomlab.kernels), which stands
    in for it when the checkout's root is on sys.path (python -m from the root)."""
    if "peft" in sys.modules:
        return sys.modules["peft"]
    folder = Path(__file__).resolve().parents[2] / "kernels"
    shadows = [p for p in sys.path if (Path(p or ".").resolve() / "kernels") == folder]
    kept = list(sys.path)
    sys.path[:] = [p for p in sys.path if p not in shadows]
    try:
        import peft
        import peft.tuners.lora  # noqa: F401  (imports transformers' integrations while the path is clean)
    finally:
        sys.path[:] = kept
    return peft


class LoRA(Strategy):
    name = "lora"
    knob = ("rank", -1)  # a smaller rank keeps the update closer to the phase start
    stores = "nothing (the adapters are merged into the weights at each phase end)"
    merge = 1.0  # share of the adapters' update merged at the phase end

    def __init__(self, context: PhaseContext, *, rank: int, scale: float, dropout: float):
        super().__init__(context)
        self.rank, self.scale, self.dropout = rank, scale, dropout
        self.adapted = None  # peft's LoraModel around the trained model, during the phase

    def start_phase(self, model):
        peft = import_peft()
        self.trainable = {n: p.requires_grad for n, p in model.named_parameters()}
        config = peft.LoraConfig(r=self.rank, lora_alpha=self.scale * self.rank, lora_dropout=self.dropout,
                                 target_modules=TARGETS, bias="none")
        # A's initial draw as a function of seed and phase (B starts at zero: the model is unchanged),
        # so that a phase started after a resume draws what an uninterrupted run draws
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.context.seed * 1_000_003 + self.context.phase * INIT_SALT)
            self.adapted = peft.tuners.lora.LoraModel(model, config, "default")
        model.logit_scale.requires_grad_(True)  # a documented choice: the temperature keeps training
        # peft's attention adapter adds its update into the frozen in_proj and out_proj weights for
        # each forward and subtracts it after (re-registering them as new parameters): the rounding
        # left behind is undone after every step
        self.attention_weights = {n: p.detach().clone() for n, p in model.named_parameters()
                                  if ".attn.base_layer." in n and not p.requires_grad}
        return super().start_phase(model)

    @torch.no_grad()
    def after_step(self, model, done):
        for n, p in model.named_parameters():
            if n in self.attention_weights:
                p.copy_(self.attention_weights[n])

    def loss(self, images, tokens, feats, step):
        from geomlab import kernels
        clip = kernels.clip_loss(feats.image, feats.text, feats.logit_scale, **feats.columns())
        return clip, {"clip": clip}

    def checkpoint_weights(self, model):
        """The adapters merged into a copy (in full: the model as it computes), open_clip's keys."""
        if self.adapted is None:
            return model.state_dict()
        merged = copy.deepcopy(self.adapted).merge_and_unload()
        return self.plain(merged).state_dict()

    def plain(self, model):
        """`model` less what the strategy added besides the adapters (cclip: its projector)."""
        return model

    def end_phase(self, model):
        from peft.tuners.lora import LoraLayer
        if self.merge != 1.0:
            for module in model.modules():
                if isinstance(module, LoraLayer):
                    module.scale_layer(self.merge)
        self.adapted.merge_and_unload()
        self.adapted = None
        for n, p in model.named_parameters():  # as before the phase: a plain open_clip model
            p.requires_grad_(self.trainable.get(n, True))
