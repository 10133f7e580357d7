from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.data import Dataset

from geomlab.data import Stream


@dataclass
class Features:
    """L2-normalised features of one batch. On one process `*_all` is the batch itself; under
    torchrun, `image`/`text` are this rank's rows and `*_all` the gathered batch (with gradient)."""
    image: torch.Tensor
    text: torch.Tensor
    image_all: torch.Tensor
    text_all: torch.Tensor
    logit_scale: torch.Tensor
    row_offset: int = 0

    @property
    def distributed(self) -> bool:
        return self.image_all is not self.image

    def columns(self) -> dict:
        """Keyword arguments telling a geomlab.kernels loss which gathered columns this rank's rows
        are scored against (none on one process: the batch is its own columns)."""
        if not self.distributed:
            return {}
        return {"image_all": self.image_all, "text_all": self.text_all, "row_offset": self.row_offset}


@dataclass(frozen=True)
class PhaseContext:
    """What the trainer gives every strategy at the start of a phase."""
    stream: Stream
    previous_model: torch.nn.Module | None          # frozen copy of the phase-start model (None unless
                                                    # the strategy sets needs_previous_model)
    encode: Callable                                # encode(model, images, tokens) -> (image, text) features
    gather: Callable[[torch.Tensor], torch.Tensor]  # all-gather across ranks (identity on one process)


class Strategy(abc.ABC):
    """Built once per phase as `cls(context, **config[cls.name])`: a strategy's options are the
    keyword arguments of its constructor, named as the keys of its config section."""
    name: str = ""
    needs_previous_model: bool = False  # True: the trainer snapshots the phase-start model for it

    def __init__(self, context: PhaseContext):
        self.context = context

    @classmethod
    def train_data(cls, stream: Stream, phase: int) -> Dataset:
        return stream.phases[phase].train

    @abc.abstractmethod
    def loss(self, images: torch.Tensor, tokens: torch.Tensor, feats: Features) -> tuple[torch.Tensor, dict]:
        """(total loss, named parts to log) of one batch; `feats` hold the current model's features."""
