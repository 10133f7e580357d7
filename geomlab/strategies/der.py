"""DER, Dark Experience Replay (Buzzega et al. 2020; mammoth's models/der.py and derpp.py) for
CLIP: the buffer also keeps the network's "logits" for each sample, taken when it was stored (at
the end of the sample's phase): its logit-scaled similarity rows against a fixed anchor set of
buffered pairs, s·I_i·T_Aᵀ (image) and s·T_i·I_Aᵀ (caption). Each batch is (1 − replay_fraction)
new rows and replay_fraction replayed ones (as ER), then, riding after them, DER++'s second replay
draw (β > 0) and the anchors, all embedded in one forward pass; the loss is the CLIP loss of the new
rows, plus α times the mean squared error between the replayed rows' current similarity rows (the
anchors embedded by the current model) and the stored ones, plus β times the CLIP loss of the
second draw. target = "embedding" keeps the older form: the stored image and text embeddings and
their squared distance. docs/definitions.md, "DER loss"."""
from __future__ import annotations

import torch
from torch.utils.data import ConcatDataset

from geomlab import kernels

from .base import PhaseContext
from .replay import BufferData, Replay

SECOND_ORDER = 2  # context.order stream of DER++'s second replay draw (1: the first draw's)
ANCHOR_SALT = 1_000_002  # seeds the anchors' draw (the reservoir's generators use seed·1_000_003 + phase)
TARGETS = ("logits", "embedding")


class DER(Replay):
    name = "der"
    knob = ("alpha", +1)
    stores = ("samples: buffer_size past pairs, each with its image and caption similarity rows against "
              "the anchors (2 × anchor_size floats; target = embedding: 2 × the embedding width)")

    def __init__(self, context: PhaseContext, *, buffer_size: int, replay_fraction: float, alpha: float,
                 beta: float, target: str, anchor_size: int):
        super().__init__(context, buffer_size=buffer_size, replay_fraction=replay_fraction)
        if target not in TARGETS:
            raise ValueError(f"der.target must be one of {', '.join(TARGETS)}, got {target!r}")
        self.alpha, self.beta, self.target, self.anchor_size = alpha, beta, target, anchor_size

    @property
    def n_second(self) -> int:
        """Rows of DER++'s second replay draw (as many as the first; none for DER)."""
        return self.n_replay if self.beta else 0

    @property
    def n_anchors(self) -> int:
        """Anchor rows riding in each batch (none without replayed rows to score against them)."""
        return len(self.anchor_data) if self.target == "logits" and self.n_replay else 0

    def start_phase(self, model):
        super().start_phase(model)
        device = next(model.parameters()).device
        if self.target == "logits":
            self.stored = self.state["image_row"].to(device), self.state["text_row"].to(device)
            self.anchor_data = BufferData(self.context.stream, self.state["anchor_phase"].tolist(),
                                          self.state["anchor_index"].tolist())
        else:
            self.stored = self.state["image"].to(device), self.state["text"].to(device)
        extra, world = self.n_second + self.n_anchors, self.context.world
        if extra % world:
            raise ValueError(f"der: the rows riding after the batch (DER++'s second draw {self.n_second} + "
                             f"anchors {self.n_anchors} = {extra}) must be a multiple of the number of "
                             f"processes ({world})")
        parts = [self.context.data, self.buffer]
        return ConcatDataset(parts + [self.anchor_data] if self.target == "logits" else parts)

    def step_indices(self, step):
        """Replay's batch (B rows: new, then replayed), then DER++'s second draw from the buffer (an
        order of its own, independent of the first), then the anchors."""
        rows = super().step_indices(step)
        n, m = len(self.context.data), len(self.buffer)
        if self.n_second:
            rows += [n + r for r in self.context.order(m, self.n_second, step, SECOND_ORDER)]
        return rows + [n + m + a for a in range(self.n_anchors)]

    @torch.no_grad()
    def embed(self, model, samples):
        """(image, text) features of a dataset's items, float32 on the CPU, eval mode."""
        was_training = model.training
        model.eval()
        image, text = [], []
        size = self.context.batch_size
        for lo in range(0, len(samples), size):
            rows = list(range(lo, min(lo + size, len(samples))))
            i, t = self.context.encode(model, *self.context.load_batch(samples, rows))
            image.append(i.float().cpu())
            text.append(t.float().cpu())
        model.train(was_training)
        if not image:  # an empty buffer (a pretrained base's phase 0 offers nothing)
            return torch.zeros(0, 0), torch.zeros(0, 0)
        return torch.cat(image), torch.cat(text)

    @torch.no_grad()
    def store(self, model, before, after, written):
        """The targets of the samples just written into the buffer, from the model as it is now (the
        end of their phase); the other slots keep theirs. The anchors are drawn once, from the first
        buffer that holds samples (phase 0's at the start of phase 1; phase 1's after a pretrained
        base, whose phase 0 holds none), and kept for every later phase."""
        stored = {}
        if self.target == "logits":
            if len(before.get("anchor_phase", ())):
                anchors = {k: before[k] for k in ("anchor_phase", "anchor_index")}
            else:
                generator = torch.Generator().manual_seed(self.context.seed * 1_000_003 + ANCHOR_SALT)
                pick = torch.randperm(len(after["phase"]), generator=generator)[: self.anchor_size].sort().values
                anchors = {"anchor_phase": after["phase"][pick], "anchor_index": after["index"][pick]}
            stored.update(anchors)
            anchor_image, anchor_text = self.embed(model, BufferData(
                self.context.stream, anchors["anchor_phase"].tolist(), anchors["anchor_index"].tolist()))
        samples = BufferData(self.context.stream, after["phase"][written].tolist(), after["index"][written].tolist())
        image, text = self.embed(model, samples)
        if self.target == "logits":
            scale = model.logit_scale.detach().exp().float().cpu()
            new = {"image_row": scale * image @ anchor_text.T, "text_row": scale * text @ anchor_image.T}
        else:
            new = {"image": image, "text": text}
        for key, value in new.items():
            out = torch.zeros(len(after["phase"]), value.shape[1])
            if len(before.get(key, ())):
                out[: len(before[key])] = before[key]
            out[written] = value
            stored[key] = out
        return {**after, **stored}

    def target_error(self, replay, slots, feats):
        """This rank's share of the distillation term over its replayed rows `replay`."""
        k = self.n_replay
        if self.target == "embedding":
            # ½ [(1/k) Σ ‖I − I*‖² + (1/k) Σ ‖T − T*‖²] (half-precision features meet float32 in float32)
            return 0.5 * ((replay.image - self.stored[0][slots]).square().sum()
                          + (replay.text - self.stored[1][slots]).square().sum()) / k
        # F.mse_loss(current rows, stored rows), reduction "mean" over the k × 2·|A| entries; the
        # anchors are the batch's last rows, every rank scoring its rows against all of them
        lo = self.context.batch_size + self.n_second
        up = lambda x: x.to(torch.promote_types(x.dtype, torch.float32))  # noqa: E731 (half: in float32)
        anchor_image, anchor_text = (up(x[lo: lo + self.n_anchors]) for x in (feats.image_all, feats.text_all))
        scale = up(feats.logit_scale)
        image_row, text_row = scale * up(replay.image) @ anchor_text.T, scale * up(replay.text) @ anchor_image.T
        return ((image_row - self.stored[0][slots]).square().sum()
                + (text_row - self.stored[1][slots]).square().sum()) / (2 * k * self.n_anchors)

    def loss(self, images, tokens, feats, step):
        B, k = self.context.batch_size, self.n_replay
        zero = feats.image.new_zeros((), dtype=torch.float32)
        new, replay = feats.rows(0, B - k), feats.rows(B - k, B) if k else None
        clip = kernels.clip_loss(new.image, new.text, new.logit_scale, **new.columns()) if new is not None else zero
        parts = {"clip": clip}
        total = clip
        if k:
            mse = zero
            if replay is not None:  # this rank's replayed rows: positions row_offset.. of the replayed ones
                slots = self.replayed_slots(step)[replay.row_offset: replay.row_offset + replay.image.shape[0]]
                mse = self.target_error(replay, torch.tensor(slots, device=self.stored[0].device), feats)
            total = total + self.alpha * mse
            parts["der_mse"] = mse
            if self.beta:  # DER++: the CLIP loss of the second draw, in-batch among its own rows
                second = feats.rows(B, B + self.n_second)
                clip_replay = zero if second is None else kernels.clip_loss(
                    second.image, second.text, second.logit_scale, **second.columns())
                total = total + self.beta * clip_replay
                parts["clip_replay"] = clip_replay
        return total, parts
