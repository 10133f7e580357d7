"""Plain fine-tuning: the CLIP contrastive loss on the current phase's data only."""
from geomlab import kernels

from .base import Strategy


class Finetune(Strategy):
    name = "finetune"

    def loss(self, images, tokens, feats, step):
        clip = kernels.clip_loss(feats.image, feats.text, feats.logit_scale, **feats.columns())
        return clip, {"clip": clip}
