"""Phase streams: what the trainer consumes, whatever the source (ShapeWorld, COCO, Flickr30K, ...).

A `Stream` is an ordered list of training phases plus the probe sets (held-out, disjoint from
training) that every checkpoint is measured on. Phase 0 trains the base model shared by all
strategies. Probe sets are in stream order; for ShapeWorld probe d is domain d's test split.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset


class DataError(ValueError):
    """A bad data file or record (missing or unreadable image, bad caption, malformed annotations).

    The message names the file and the record. Raised inside a DataLoader worker, torch re-raises it
    in the main process with the worker's traceback folded into the message; the constructor keeps
    only the original one-line message, so `str(e)` is always that line.
    """

    def __init__(self, message: str = ""):
        message = str(message)
        if "Original Traceback" in message:
            lines = [ln for ln in message.strip().splitlines() if ln.strip()]
            last = lines[-1] if lines else message
            message = last.split("DataError: ", 1)[1] if "DataError: " in last else last
        super().__init__(message)


@dataclass
class Phase:
    name: str
    train: Dataset  # item i -> (image tensor [C, H, W] float, caption str, sample id int)


@dataclass
class ProbeSet:
    name: str
    images: Dataset                  # item i -> image tensor [C, H, W]
    captions: Sequence[str]          # every caption, M >= N
    caption_image: torch.Tensor      # [M] int64: image row of each caption
    ids: torch.Tensor                # [N] int64 sample ids (row i of every trace is the same pair)

    @property
    def one_caption_per_image(self) -> bool:
        return len(self.captions) == len(self.ids) and bool(
            (self.caption_image == torch.arange(len(self.ids))).all())


@dataclass
class Stream:
    phases: list[Phase]
    probes: list[ProbeSet]
    info: dict = field(default_factory=dict)  # what built it (recorded in run.json)
    skipped: list = field(default_factory=list)  # bad records skipped under on_bad_sample="skip"


# name -> builder(data_config: dict, *, image_size: int, preprocess, seed: int) -> Stream
STREAMS: dict[str, Callable[..., Stream]] = {}


def register_stream(name: str):
    def deco(fn):
        STREAMS[name] = fn
        return fn
    return deco


def build_stream(name: str, options: dict, *, image_size: int, preprocess, seed: int) -> Stream:
    from . import phases, shapes  # noqa: F401  (register "datasets" and "shapes")
    if name not in STREAMS:
        raise ValueError(f"data.stream: unknown stream {name!r}; valid: {', '.join(sorted(STREAMS))}")
    return STREAMS[name](options, image_size=image_size, preprocess=preprocess, seed=seed)
