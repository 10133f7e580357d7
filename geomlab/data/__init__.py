"""Phase streams: what the trainer consumes, whatever the source (ShapeWorld, COCO, Flickr30K, ...).

A `Stream` is an ordered list of training phases plus the probe sets (held-out, disjoint from
training) that every checkpoint is measured on. Phase 0 trains the base model shared by all
strategies (or, with a pretrained base, holds no data: with_pretrained_base). Probe sets are in stream order and each records the phases that train on its data
(for ShapeWorld probe d is domain d's test split, learned at phase d). Each seen probe set may have a
calibration set beside it (`calibration_name`, kind CALIBRATION_KIND): pairs of the same data disjoint
from the probe and from training, embedded into every trace like a probe so that realignment maps
can be fitted on them and scored on the probe (docs/definitions.md, "Calibration split"); nothing
scores or reports a calibration set itself. Zero-shot sets, when the stream has any, are classified
at every checkpoint as well.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset, Subset

# the probe-set kinds and the calibration split's names: in a torch-free module, for geomlab.config
from geomlab.probe_kinds import (CALIBRATION_KIND, CALIBRATION_SIZE, CALIBRATION_SUFFIX, NOVEL_KIND,  # noqa: F401
                                 SCORED_KINDS, SEEN_KIND, calibration_name, probe_kind)


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
    ids: torch.Tensor                # [N] int64 image ids (real data: image uids); row i of every trace is the same image
    # The phases that train on the data this probe set measures (its source's phases); it is learned
    # at the last of them. () = no phase trains on it (docs/definitions.md, "Accuracy matrix").
    phases: tuple[int, ...] = ()
    # SEEN_KIND, NOVEL_KIND or CALIBRATION_KIND (above). Recorded in run.json's probe_kinds.
    kind: str = SEEN_KIND

    @property
    def one_caption_per_image(self) -> bool:
        return len(self.captions) == len(self.ids) and bool(
            (self.caption_image == torch.arange(len(self.ids))).all())

    def head(self, n: int) -> "ProbeSet":
        """The probe set of its first `n` images and their captions (a fine trace's rows,
        docs/definitions.md, "Traces"): caption_image keeps pointing at the same image rows."""
        if n >= len(self.ids):
            return self
        keep = torch.nonzero(self.caption_image < n).flatten()
        # real data keeps its decoded pixels and its own batching (embed_probe); rendered data a Subset
        images = self.images.head(n) if hasattr(self.images, "head") else Subset(self.images, range(n))
        return dataclasses.replace(self, images=images, captions=[self.captions[i] for i in keep.tolist()],
                                   caption_image=self.caption_image[keep], ids=self.ids[:n])


@dataclass
class ZeroShotSet:
    """Zero-shot classification data (docs/definitions.md, "Zero-shot classification"): each image's
    class among `classes`, scored by the prompts `templates` filled with each class name."""
    name: str
    classes: list[str]               # class names, filled into each template's "{}"
    templates: list[str]             # several: the class embedding is their normalised mean
    labels: torch.Tensor             # [N] int64: class of each image
    images: Dataset | None = None    # item i -> image tensor [C, H, W]; None: the images of `probe`
    probe: str | None = None         # a probe set with these very images, whose embeddings are reused


@dataclass
class Stream:
    phases: list[Phase]
    probes: list[ProbeSet]
    info: dict = field(default_factory=dict)  # what built it (recorded in run.json)
    skipped: list = field(default_factory=list)  # bad records skipped under on_bad_sample="skip"
    zeroshot: list[ZeroShotSet] = field(default_factory=list)  # evaluated at every checkpoint
    reference: Dataset | None = None  # pairs (items as Phase.train's) held out from every phase and
                                      # probe set: distillation data for a strategy (ZSCL: its images)
    # ZSCL's reference text pool: sentences no probe set holds, scored against the reference images
    # (ShapeWorld: captions of other reference samples, unpaired with the images; real data: the
    # reference sources' distinct captions)
    reference_texts: list[str] = field(default_factory=list)


PRETRAINED_PHASE = "pretrained"


def with_pretrained_base(stream: Stream) -> Stream:
    """The stream with a phase 0 of no data in front (train.base = "pretrained": the pretrained
    weights are that phase's end, row 0 of the accuracy matrix): the stream's own phases become
    1..N and each probe set's phases move with them."""
    empty = Phase(PRETRAINED_PHASE, Subset(stream.phases[0].train, []))
    probes = [dataclasses.replace(p, phases=tuple(t + 1 for t in p.phases)) for p in stream.probes]
    return dataclasses.replace(stream, phases=[empty, *stream.phases], probes=probes,
                               info={**stream.info, "base": PRETRAINED_PHASE})


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
