"""EWC, Elastic Weight Consolidation (Kirkpatrick et al. 2017): the CLIP loss plus the penalty
(λ/2)·Σ F·(θ − θ*)², F the diagonal Fisher information of the phases seen so far (their running
average) and θ* the weights at the end of the previous phase (docs/definitions.md, "EWC penalty").

Phase P's start folds phase P − 1 in: F_{P−1} is the mean of the squared gradients of the CLIP
loss over `fisher_batches` batches of phase P − 1's data at the phase-start weights (= θ*), and
F = ((P − 1)·F_before + F_{P−1}) / P. F and θ* are saved in strategy_state/phaseP.safetensors."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from geomlab import kernels

from .base import PhaseContext, Strategy

FISHER_ORDER = 2  # context.order stream of the Fisher batches (0: the phase's batches)


def diagonal_fisher(model, data, context: PhaseContext, batches: int) -> dict[str, torch.Tensor]:
    """Mean over `batches` batches of `data` of the squared gradient of the batch's CLIP loss, per
    trainable parameter (eval mode, the optimizer's gradients untouched)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    was_training = model.training
    model.eval()
    for b in range(batches):
        images, tokens = context.load_batch(data, context.order(len(data), context.batch_size, b, FISHER_ORDER))
        image, text, logit_scale = model(images, tokens)[:3]
        grads = torch.autograd.grad(kernels.clip_loss(image, text, logit_scale), list(params.values()),
                                    allow_unused=True)
        for name, g in zip(params, grads):
            if g is not None:
                fisher[name] += g.square()
    model.train(was_training)
    return {n: f / batches for n, f in fisher.items()}


class EWC(Strategy):
    name = "ewc"

    def __init__(self, context: PhaseContext, *, weight: float, fisher_batches: int):
        super().__init__(context)
        self.weight, self.fisher_batches = weight, fisher_batches

    def start_phase(self, model):
        phase = self.context.phase
        state = self.context.load_state(phase)
        if state is None:  # not folded in yet (a resumed phase finds it saved)
            previous = self.train_data(self.context.stream, phase - 1)
            new = diagonal_fisher(model, previous, self.context, self.fisher_batches)
            before = self.context.load_state(phase - 1) if phase > 1 else None
            if phase > 1 and before is None:
                raise FileNotFoundError(f"ewc: the state saved at the start of phase {phase - 1} is missing")
            state = {f"anchor.{n}": p.detach() for n, p in model.named_parameters() if p.requires_grad}
            for n, f in new.items():
                state[f"fisher.{n}"] = f if before is None else ((phase - 1) * before[f"fisher.{n}"].to(f) + f) / phase
            self.context.save_state(phase, state)
        # (parameter, rows, F, θ*) of the live parameters, whose values the optimizer changes in
        # place. An entry with F = 0 adds nothing to the penalty or its gradient, so a matrix's rows
        # that are all zero are left out when they are most of it: e.g. the token embedding's rows of
        # tokens no phase has used (the step would otherwise pay for all 49,408 of them).
        self.anchors = []
        for n, p in model.named_parameters():
            if p.requires_grad:
                fisher, anchor, rows = state[f"fisher.{n}"].to(p), state[f"anchor.{n}"].to(p), None
                used = fisher.any(1) if p.ndim == 2 else None
                if used is not None and 2 * int(used.sum()) < len(used):
                    rows = used.nonzero().squeeze(1)
                    fisher, anchor = fisher[rows], anchor[rows]
                self.anchors.append((p, rows, fisher, anchor.clone()))
        return super().start_phase(model)

    def penalty(self) -> torch.Tensor:
        # kept rows through a sparse embedding lookup: their gradient is sparse, with no dense zeros
        return 0.5 * self.weight * sum(
            (f * ((p if rows is None else F.embedding(rows, p, sparse=True)) - anchor).square()).sum()
            for p, rows, f, anchor in self.anchors)

    def loss(self, images, tokens, feats, step):
        clip = kernels.clip_loss(feats.image, feats.text, feats.logit_scale, **feats.columns())
        penalty = self.penalty() / self.context.world  # every rank computes it in full
        return clip + penalty, {"clip": clip, "ewc": penalty}
