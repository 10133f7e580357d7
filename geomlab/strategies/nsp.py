"""Null-space projection (Adam-NSCL, Wang et al. CVPR 2021; for CLIP: GNSP, Peng et al. 2025; DNS,
Liu et al. NeurIPS 2025; docs/definitions.md, "Null-space projection"): every step's update of each
linear map of both towers is projected onto the null space of the inputs the earlier phases fed it,
so that, to first order, what an earlier domain's inputs give out of the layer does not change.

A layer y = W x + b is treated as [W b] acting on x̃ = [x; 1]. Phase P's start folds phase P − 1 in:
C ← C + Σ x̃ x̃ᵀ over every input row (every token of every sample) of `batches` batches of phase
P − 1's data at the phase-start weights (summed over ranks under torchrun); C and the rows counted
are saved in strategy_state/phaseP.safetensors. With C = V Λ Vᵀ, the projector is P = V₀ V₀ᵀ over
the eigenvectors whose eigenvalues are at most `threshold`·λ_max. After each optimizer step,
[W b] ← [W b]_before + ([W b] − [W b]_before)·P: the whole AdamW step, weight decay included, as
Adam-NSCL projects its Adam update (a projected gradient would leave the null space under Adam's
per-coordinate scaling). threshold = 1 keeps every direction: finetune, step for step.

The layers: nn.Linear (the MLPs), the attention's fused in_proj (its input: the block's normed
input, shared by q, k and v) and out_proj (its input: the heads' attention output, recomputed from
the in_proj output, as nn.MultiheadAttention applies out_proj's weight without calling the module),
and the patch embedding (a linear map of each image patch). LayerNorms, embeddings, the towers'
final projections and the logit scale train unprojected."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import PhaseContext, Strategy

COVARIANCE_ORDER = 3  # context.order stream of the covariance batches (0: the phase's batches)


@dataclass
class Layer:
    """One projected linear map: its weight as a matrix [out, in] (a view), its bias or None, and the
    projector P over [in (+1 for the bias)] (None: every direction is free)."""
    name: str
    weight: torch.Tensor
    bias: torch.Tensor | None
    projector: torch.Tensor | None = None
    before: torch.Tensor | None = None  # [W b] after the previous step's projection

    def matrix(self) -> torch.Tensor:
        return self.weight if self.bias is None else torch.cat([self.weight, self.bias[:, None]], dim=1)

    def assign(self, matrix: torch.Tensor) -> None:
        self.weight.copy_(matrix[:, :self.weight.shape[1]])
        if self.bias is not None:
            self.bias.copy_(matrix[:, -1])


def attention_output(mha: torch.nn.MultiheadAttention, x: torch.Tensor, attn_mask) -> torch.Tensor:
    """The heads' output that nn.MultiheadAttention feeds out_proj, for self-attention on x
    [batch, length, width] (batch_first)."""
    q, k, v = F.linear(x, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)
    (B, L, d), h = x.shape, mha.num_heads
    heads = lambda t: t.reshape(B, L, h, d // h).transpose(1, 2)  # noqa: E731
    if attn_mask is not None and attn_mask.dtype == torch.bool:  # MultiheadAttention's True = masked
        attn_mask = torch.zeros(attn_mask.shape, dtype=x.dtype, device=x.device).masked_fill(attn_mask, float("-inf"))
    o = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=attn_mask)
    return o.transpose(1, 2).reshape(B, L, d)


def projected_layers(model) -> dict[str, tuple]:
    """name -> (module, weight [out, in] view, bias, kind) of every linear map the strategy projects."""
    layers = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.MultiheadAttention):
            layers[f"{name}.in_proj"] = (m, m.in_proj_weight, m.in_proj_bias, "in_proj")
            layers[f"{name}.out_proj"] = (m, m.out_proj.weight, m.out_proj.bias, "out_proj")
        elif isinstance(m, torch.nn.Linear) and not name.endswith(".out_proj"):
            layers[name] = (m, m.weight, m.bias, "linear")
        elif isinstance(m, torch.nn.Conv2d) and m.stride == m.kernel_size and m.padding == (0, 0) and m.groups == 1:
            layers[name] = (m, m.weight.view(m.weight.shape[0], -1), m.bias, "patch")
    return layers


def record_inputs(model, layers: dict, sink) -> list:
    """Forward pre-hooks calling sink(layer name, input rows [n, in]) for every projected layer."""
    def rows(x):
        return x.reshape(-1, x.shape[-1])

    hooks = []
    for name, (module, _, _, kind) in layers.items():
        if kind == "linear":
            hook = lambda m, args, kwargs, name=name: sink(name, rows(args[0]))  # noqa: E731
        elif kind == "patch":
            hook = lambda m, args, kwargs, name=name: sink(name, rows(F.unfold(  # noqa: E731
                args[0], m.kernel_size, stride=m.stride).transpose(1, 2)))
        elif kind == "in_proj":
            def hook(m, args, kwargs, name=name):
                query = args[0] if args else kwargs["query"]
                key = args[1] if len(args) > 1 else kwargs.get("key", query)
                if key is not query or kwargs.get("key_padding_mask") is not None:
                    raise ValueError(f"nsp: {name} is not plain self-attention")
                sink(name, rows(query))
        else:  # out_proj: its input is computed inside MultiheadAttention
            def hook(m, args, kwargs, name=name):
                query = args[0] if args else kwargs["query"]
                x = query if m.batch_first else query.transpose(0, 1)
                sink(name, rows(attention_output(m, x, kwargs.get("attn_mask"))))
        hooks.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    return hooks


@torch.no_grad()
def input_covariance(model, data, context: PhaseContext, batches: int, layers: dict) -> dict[str, torch.Tensor]:
    """{layer: Σ x̃ x̃ᵀ (float64)} and {"samples": rows counted} over `batches` batches of `data`,
    x̃ = [x; 1] where the layer has a bias, summed over ranks (each reads its share of a batch)."""
    sums = {n: torch.zeros(w.shape[1] + (b is not None), w.shape[1] + (b is not None), dtype=torch.float64,
                           device=w.device) for n, (_, w, b, _) in layers.items()}
    counts = {n: torch.zeros((), dtype=torch.float64, device=w.device) for n, (_, w, _, _) in layers.items()}

    def add(name, x):
        x = x.double()
        if layers[name][2] is not None:
            x = torch.cat([x, x.new_ones(len(x), 1)], dim=1)
        sums[name] += x.T @ x
        counts[name] += len(x)

    if len(data):  # a pretrained base's phase 0: no data
        dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
        share = context.batch_size // context.world
        was_training = model.training
        model.eval()
        hooks = record_inputs(model, layers, add)
        try:
            for b in range(batches):
                rows = context.order(len(data), context.batch_size, b, COVARIANCE_ORDER)
                images, tokens = context.load_batch(data, rows[context.rank * share:(context.rank + 1) * share])
                model(images.to(dtype), tokens)
        finally:
            for h in hooks:
                h.remove()
            model.train(was_training)
    out = {f"cov.{n}": context.all_sum(s) for n, s in sums.items()}
    out.update({f"rows.{n}": context.all_sum(c) for n, c in counts.items()})
    return out


def null_space_projector(covariance: torch.Tensor, threshold: float) -> torch.Tensor | None:
    """V₀V₀ᵀ over the eigenvectors of `covariance` whose eigenvalues are at most threshold·λ_max;
    None when that is every direction (no earlier inputs, or threshold = 1)."""
    values, vectors = torch.linalg.eigh(covariance.double())
    null = values <= threshold * values[-1]
    if values[-1] <= 0 or bool(null.all()):
        return None
    basis = vectors[:, null]
    return basis @ basis.T


class NSP(Strategy):
    name = "nsp"
    knob = ("threshold", -1)  # a larger threshold leaves more directions free
    stores = ("statistics, no samples: each projected layer's input covariance over the earlier phases "
              "(Σ (d_in + 1)² floats: 0.74 M for geomlab-tiny)")

    def __init__(self, context: PhaseContext, *, threshold: float, batches: int):
        super().__init__(context)
        self.threshold, self.batches = threshold, batches

    def start_phase(self, model):
        phase, layers = self.context.phase, projected_layers(model)
        state = self.context.load_state(phase)
        if state is None:  # not folded in yet (a resumed phase finds it saved)
            previous = self.train_data(self.context.stream, phase - 1)
            state = input_covariance(model, previous, self.context, self.batches, layers)
            before = self.context.load_state(phase - 1) if phase > 1 else None
            if phase > 1 and before is None:
                raise FileNotFoundError(f"nsp: the state saved at the start of phase {phase - 1} is missing")
            if before is not None:  # the earlier phases' sums, then this one's
                state = {k: before[k].to(v) + v for k, v in state.items()}
            self.context.save_state(phase, state)
        self.layers = []
        for name, (_, weight, bias, _) in layers.items():
            projector = null_space_projector(state[f"cov.{name}"].to(weight.device), self.threshold)
            self.layers.append(Layer(name, weight, bias, None if projector is None else projector.to(weight.dtype)))
        self.remember()
        return super().start_phase(model)

    @torch.no_grad()
    def remember(self) -> None:
        for layer in self.layers:
            layer.before = None if layer.projector is None else layer.matrix().clone()

    def loss(self, images, tokens, feats, step):
        from geomlab import kernels
        clip = kernels.clip_loss(feats.image, feats.text, feats.logit_scale, **feats.columns())
        return clip, {"clip": clip}

    @torch.no_grad()
    def after_step(self, model, done):
        for layer in self.layers:
            if layer.projector is not None:
                projected = layer.before + (layer.matrix() - layer.before) @ layer.projector
                layer.assign(projected)
                layer.before = projected

    def load_state_dict(self, state):
        self.remember()  # the resumed weights (loaded into the same parameters) are the step's start
