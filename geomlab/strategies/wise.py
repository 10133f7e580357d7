"""WiSE-FT per phase (Wortsman et al. 2022): train as finetune, then at the phase's end interpolate
the weights, θ ← (1 − α)·θ_start + α·θ_end, α the weight of the fine-tuned model
(docs/definitions.md, "WiSE-FT"). The phase's checkpoints before its end hold the fine-tuning path."""
import torch

from .base import PhaseContext
from .finetune import Finetune


class WiSE(Finetune):
    name = "wise"
    knob = ("alpha", -1)  # α is the fine-tuned model's weight: a smaller α keeps more of the phase start
    stores = "nothing (the phase-start weights, within a phase)"

    def __init__(self, context: PhaseContext, *, alpha: float):
        super().__init__(context)
        self.alpha = alpha

    def start_phase(self, model):
        self.start = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}
        return super().start_phase(model)

    @torch.no_grad()
    def end_phase(self, model):
        # lerp is exact at both ends: α = 1 gives θ_end and α = 0 gives θ_start, bit for bit
        for key, value in model.state_dict().items():
            if key in self.start:
                value.copy_(torch.lerp(self.start[key], value, self.alpha))
