"""EWC, Elastic Weight Consolidation (Kirkpatrick et al. 2017) in its online form (Schwarz et al.
2018; mammoth's models/ewc_on.py): the CLIP loss plus the penalty (λ/2)·Σ F·(θ − θ*)², F the
diagonal empirical Fisher of the phases seen so far, combined online, and θ* the weights at the
end of the previous phase (docs/definitions.md, "EWC penalty").

Phase P's start folds phase P − 1 in: F_{P−1} is the mean over the samples of `fisher_batches`
batches of phase P − 1's data, at the phase-start weights (= θ*), of the squared gradient of each
sample's own terms of the batch's CLIP loss, and F = γ·F_before + F_{P−1}. F and θ* are saved in
strategy_state/phaseP.safetensors."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call, jacrev, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from geomlab import kernels

from .base import PhaseContext, Strategy

FISHER_ORDER = 2  # context.order stream of the Fisher batches (0: the phase's batches)
CHUNK_BYTES = 2 ** 28  # per-sample gradients held at once (the vectorised backward's chunk)


def per_sample_clip_losses(image, text, logit_scale):
    """l_i = ½[CE of image i's row of s·I Tᵀ + CE of caption i's row of s·T Iᵀ]: sample i's own
    terms of the batch's CLIP loss (their mean is the loss)."""
    logits = logit_scale * image @ text.T
    labels = torch.arange(len(image), device=image.device)
    return 0.5 * (F.cross_entropy(logits, labels, reduction="none")
                  + F.cross_entropy(logits.T, labels, reduction="none"))


def _lookups(model, images, tokens) -> dict:
    """{weight name: (module, indices, output shape)} of the trainable embedding tables the forward
    looks up exactly once (the token embedding): their per-sample gradient goes through the rows
    looked up, not through the whole table (49,408 rows, most of them unused)."""
    tables = {(f"{n}." if n else "") + "weight": m for n, m in model.named_modules()
              if isinstance(m, torch.nn.Embedding) and m.weight.requires_grad}
    calls = {n: [] for n in tables}
    hooks = [m.register_forward_hook(lambda m, args, out, n=n: calls[n].append((args[0], out.shape)))
             for n, m in tables.items()]
    try:
        with torch.no_grad():
            model(images, tokens)
    finally:
        for h in hooks:
            h.remove()
    return {n: (tables[n], *calls[n][0]) for n in tables if len(calls[n]) == 1}


def _batch_squares(model, images, tokens, fisher: dict) -> None:
    """Add Σ_i (∂l_i/∂θ)² over the batch's samples to `fisher` (one forward, then a backward
    vectorised over the samples' cotangents of the features, in chunks)."""
    lookups = _lookups(model, images, tokens)
    weights = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad and n not in lookups}
    delta = {n: torch.zeros(shape, dtype=m.weight.dtype, device=m.weight.device)
             for n, (m, _, shape) in lookups.items()}

    def features(weights, delta):
        # a table's output is replaced by itself + delta: the gradient of delta is that of the rows
        hooks = [lookups[n][0].register_forward_hook(lambda m, args, out, n=n: out.detach() + delta[n])
                 for n in delta]
        try:
            return tuple(functional_call(model, weights, (images, tokens))[:3])
        finally:
            for h in hooks:
                h.remove()

    (image, text, scale), pullback = vjp(features, weights, delta)
    cotangents = jacrev(per_sample_clip_losses, argnums=(0, 1, 2))(image.detach(), text.detach(), scale.detach())
    B = image.shape[0]
    size = sum(w.numel() * w.element_size() for w in weights.values())
    chunk = max(1, min(16, B, CHUNK_BYTES // max(size, 1)))
    for lo in range(0, B, chunk):
        grads, rows = vmap(pullback)(tuple(c[lo:lo + chunk] for c in cotangents))
        for n, g in grads.items():
            fisher[n] += g.square().sum(0)
        for n, (module, indices, _) in lookups.items():
            used, where = indices.unique(return_inverse=True)
            g = rows[n].flatten(1, -2)  # (samples, lookups, width)
            per_sample = g.new_zeros(g.shape[0], len(used), g.shape[-1]).index_add_(1, where.flatten(), g)
            fisher[n][used] += per_sample.square().sum(0)


def diagonal_fisher(model, data, context: PhaseContext, batches: int) -> dict[str, torch.Tensor]:
    """Per trainable parameter, the mean over the samples of `batches` batches of `data` of the
    squared gradient of the sample's own terms of its batch's CLIP loss (eval mode, the
    optimizer's gradients untouched)."""
    fisher = {n: torch.zeros_like(p) for n, p in model.named_parameters() if p.requires_grad}
    if not len(data):  # a pretrained base's phase 0: no data, nothing learned from it to protect
        return fisher
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    was_training = model.training
    model.eval()
    samples = 0
    try:
        # attention as plain matrix products, whose backward vectorises over the samples
        with sdpa_kernel(SDPBackend.MATH):
            for b in range(batches):
                images, tokens = context.load_batch(data, context.order(len(data), context.batch_size, b, FISHER_ORDER))
                _batch_squares(model, images.to(dtype), tokens, fisher)
                samples += len(images)
    finally:
        model.train(was_training)
    return {n: f / samples for n, f in fisher.items()}


class EWC(Strategy):
    name = "ewc"
    knob = ("weight", +1)
    stores = "floats: the diagonal Fisher and θ* (2 × the trainable weights)"

    def __init__(self, context: PhaseContext, *, weight: float, fisher_batches: int, gamma: float):
        super().__init__(context)
        self.weight, self.fisher_batches, self.gamma = weight, fisher_batches, gamma

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
            for n, f in new.items():  # online EWC: F ← γ·F_before + F_new
                state[f"fisher.{n}"] = f if before is None else self.gamma * before[f"fisher.{n}"].to(f) + f
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
