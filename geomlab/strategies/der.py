"""DER, Dark Experience Replay (Buzzega et al. 2020) for CLIP, the Mod-X paper's CLIP_DER: the
buffer also keeps the image and text embeddings the model gave each sample when it was stored
(at the end of the sample's phase). Each batch is (1 − replay_fraction) new rows and
replay_fraction replayed ones (as ER); the loss is the CLIP loss of the new rows, plus α times the
mean squared distance between the replayed rows' embeddings and the stored ones, plus β times the
CLIP loss of the replayed rows (DER++; β = 0 is DER). docs/definitions.md, "DER loss"."""
from __future__ import annotations

import torch

from geomlab import kernels

from .base import PhaseContext
from .replay import BufferData, Replay


class DER(Replay):
    name = "der"

    def __init__(self, context: PhaseContext, *, buffer_size: int, replay_fraction: float, alpha: float,
                 beta: float):
        super().__init__(context, buffer_size=buffer_size, replay_fraction=replay_fraction)
        self.alpha, self.beta = alpha, beta

    def start_phase(self, model):
        data = super().start_phase(model)
        device = next(model.parameters()).device
        self.stored = self.state["image"].to(device), self.state["text"].to(device)
        return data

    @torch.no_grad()
    def store(self, model, before, after, written):
        """Embed the samples just written into the buffer with the model as it is now (the end of
        their phase); the other slots keep their stored embeddings."""
        samples = BufferData(self.context.stream, after["phase"][written].tolist(), after["index"][written].tolist())
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
        image, text = torch.cat(image), torch.cat(text)
        stored = {}
        for key, new in (("image", image), ("text", text)):
            out = torch.zeros(len(after["phase"]), new.shape[1])
            if key in before:
                out[: len(before[key])] = before[key]
            out[written] = new
            stored[key] = out
        return {**after, **stored}

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
                slots = torch.tensor(slots, device=self.stored[0].device)
                # (half-precision features meet the float32 stored ones in float32)
                mse = 0.5 * ((replay.image - self.stored[0][slots]).square().sum()
                             + (replay.text - self.stored[1][slots]).square().sum()) / k
            total = total + self.alpha * mse
            parts["der_mse"] = mse
            if self.beta:
                clip_replay = zero if replay is None else kernels.clip_loss(
                    replay.image, replay.text, replay.logit_scale, **replay.columns())
                total = total + self.beta * clip_replay
                parts["clip_replay"] = clip_replay
        return total, parts
