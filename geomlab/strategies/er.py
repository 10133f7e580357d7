"""ER, experience replay (Chaudhry et al. 2019; Rolnick et al. 2019): each batch is
(1 − replay_fraction) new data and replay_fraction samples replayed from a reservoir buffer of
every phase seen; the CLIP loss over the whole batch (docs/definitions.md, "Replay")."""
from geomlab import kernels

from .replay import Replay


class ER(Replay):
    name = "er"
    knob = ("replay_fraction", +1)
    stores = "samples: buffer_size past pairs"

    def loss(self, images, tokens, feats, step):
        clip = kernels.clip_loss(feats.image, feats.text, feats.logit_scale, **feats.columns())
        return clip, {"clip": clip}
