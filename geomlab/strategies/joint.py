"""Joint training, the upper bound: the CLIP loss on the union of every phase seen so far."""
from torch.utils.data import ConcatDataset

from .finetune import Finetune


class Joint(Finetune):
    name = "joint"
    stores = "samples: every past phase's data"

    @classmethod
    def train_data(cls, stream, phase):
        return ConcatDataset([p.train for p in stream.phases[: phase + 1]])
