"""The strategy interface: what the trainer gives a strategy (`PhaseContext`), the features of a
batch (`Features`), and the named hooks it calls at fixed points of a phase (`Strategy`).

A strategy is built afresh for every phase, while the model holds the phase-start weights, as
`cls(context, **config[cls.name])`. The trainer then calls, in this order and nowhere else:

    data = strategy.start_phase(model)        once, before the first step (resumed phases too)
    for step in range(start, total):
        rows = strategy.step_indices(step)    the step's global batch: indices into `data`
        loss, parts = strategy.loss(images, tokens, features, step)
        (backward, optimizer step)
        strategy.after_step(model, step + 1)  may change the step's update (nsp projects it)
        if step + 1 == total:
            strategy.end_phase(model)         may set the phase's result weights
        (at checkpoints: the checkpoint holds strategy.checkpoint_weights(model), state.pt
         the model's own state_dict() and strategy.state_dict())

and, resuming mid-phase, `strategy.load_state_dict(saved)` after `start_phase`. start_phase may change
the model itself (lora: adapters, the only trainable parameters), before the optimizer is built
over its trainable parameters (and, under torchrun, DistributedDataParallel over them); end_phase
then returns it to a plain open_clip model. Every hook's result
is a function of the phase-start weights, the step number and the saved state, so a resumed phase
repeats an uninterrupted one. What a strategy carries between phases (EWC's Fisher, a replay
buffer) it computes in `start_phase` from the previous phase and keeps in the run directory as
`strategy_state/phaseP.safetensors` (`context.load_state` / `context.save_state`); the base phase
is trained by the shared base model, so phase P's start is where phase P − 1 is folded in.
"""
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

    def rows(self, lo: int, hi: int) -> "Features | None":
        """The batch cut to its global rows lo..hi−1 (rows and columns alike): this rank's rows among
        them, `row_offset` = the first one's position in the cut. None when this rank holds none."""
        b, off = self.image.shape[0], self.row_offset
        first, last = max(lo, off), min(hi, off + b)
        if first >= last:
            return None
        image, text = self.image[first - off: last - off], self.text[first - off: last - off]
        if not self.distributed:
            return Features(image, text, image, text, self.logit_scale)
        return Features(image, text, self.image_all[lo:hi], self.text_all[lo:hi], self.logit_scale,
                        row_offset=first - lo)


@dataclass(frozen=True)
class PhaseContext:
    """What the trainer gives every strategy at the start of a phase."""
    stream: Stream
    phase: int
    data: Dataset                                   # the phase's new data: train_data(stream, phase)
    batch_size: int                                 # the global batch (all ranks' rows together)
    order: Callable[..., list[int]]                 # order(n, size, step, stream=0): `size` rows of a dataset
                                                    # of n items for `step`; seeded by run, phase and `stream`
                                                    # (0 is the trainer's own order of `data`)
    load_batch: Callable                            # load_batch(dataset, rows) -> (images, tokens) on the device
    encode: Callable                                # encode(model, images, tokens) -> (image, text) features
    gather: Callable[[torch.Tensor], torch.Tensor]  # all-gather across ranks (identity on one process)
    load_state: Callable[[int], dict | None]        # load_state(phase): saved cross-phase state, or None
    save_state: Callable[[int, dict], None]         # save_state(phase, tensors) (rank 0 writes)
    previous_model: torch.nn.Module | None = None   # frozen phase-start model (needs_previous_model)
    base_model: torch.nn.Module | None = None       # frozen end-of-phase-0 model (needs_base_model)
    seed: int = 0                                   # the run's seed, for a strategy's own random draws
    rank: int = 0
    world: int = 1                                  # a term every rank computes in full is divided by it:
                                                    # the ranks' losses add up to the full-batch loss
    tokenizer: Callable | None = None               # tokenizer(list of str) -> tokens (CPU): a strategy's
                                                    # own texts (ZSCL's reference pool)
    all_sum: Callable[[torch.Tensor], torch.Tensor] = torch.clone  # the sum over ranks (a copy on one process)

    @torch.no_grad()
    def teacher(self, model: torch.nn.Module, images, tokens, feats: Features):
        """(image, text, columns): a frozen model's features of the batch's rows, and the kernel
        keywords that score them against the gathered batch under torchrun (`feats.columns()` plus
        the gathered teacher columns; none on one process)."""
        image, text = self.encode(model, images, tokens)
        columns = feats.columns()
        if columns:
            columns.update(image_old_all=self.gather(image), text_old_all=self.gather(text))
        return image, text, columns


class Strategy(abc.ABC):
    """Built once per phase as `cls(context, **config[cls.name])`: a strategy's options are the
    keyword arguments of its constructor, named as the keys of its config section."""
    name: str = ""
    needs_previous_model: bool = False  # True: the trainer snapshots the phase-start model for it
    needs_base_model: bool = False      # True: the trainer loads the base model (end of phase 0) for it
    # The strength knob that `python -m geomlab.tune` searches: (option, +1 when a larger value
    # regularises more, −1 when a smaller one does); None for a strategy without one. Ties in a
    # tuning go to the weaker regulariser, which this direction defines.
    knob: tuple[str, int] | None = None
    # What the strategy keeps from earlier phases beyond the weights (the study's "stores" column).
    stores: str = "nothing"

    def __init__(self, context: PhaseContext):
        self.context = context

    @classmethod
    def train_data(cls, stream: Stream, phase: int) -> Dataset:
        """The phase's new data (its length sets the number of steps when training by epochs)."""
        return stream.phases[phase].train

    @classmethod
    def check_stream(cls, stream: Stream) -> None:
        """Raise ValueError, naming what is missing, when `stream` lacks what the strategy needs."""

    def start_phase(self, model: torch.nn.Module) -> Dataset:
        """Once per phase before its first step, the model at the phase-start weights: prepare, and
        return the dataset `step_indices` index."""
        return self.context.data

    def step_indices(self, step: int) -> list[int]:
        """The global batch of `step` as indices into start_phase's dataset: a function of the step
        alone (and the saved state), so that a resumed run sees the batches an uninterrupted one does."""
        return self.context.order(len(self.context.data), self.context.batch_size, step)

    @abc.abstractmethod
    def loss(self, images: torch.Tensor, tokens: torch.Tensor, feats: Features,
             step: int) -> tuple[torch.Tensor, dict]:
        """(this rank's share of the batch loss, named parts to log); `feats` hold the current
        model's features of the rows of `step_indices(step)` this rank holds."""

    def after_step(self, model: torch.nn.Module, done: int) -> None:
        """After the optimizer step that completes `done` steps of the phase."""

    def end_phase(self, model: torch.nn.Module) -> None:
        """After the last step, before the phase-end checkpoint: may set the phase's result weights."""

    def checkpoint_weights(self, model: torch.nn.Module) -> dict:
        """The open_clip state dict a checkpoint holds (the model as it computes; lora: the adapters
        merged in, open_clip's keys)."""
        return model.state_dict()

    def state_dict(self) -> dict:
        """Mid-phase state that --resume needs (tensors and numbers), saved in state.pt."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict returned (called after start_phase when resuming mid-phase)."""
