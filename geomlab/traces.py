"""Geometry traces, the file format: probe embeddings at one checkpoint in one safetensors file
(docs/definitions.md, "Traces"). Where a run keeps its traces is geomlab.rundir's business.

Tensors: `<domain>.image` [N, d] and `<domain>.text` [M, d] (L2-normalised, float16),
`<domain>.ids` [N] int64 image ids (the same image, the same id, in every trace of a run), and, with several captions per image,
`<domain>.caption_image` [M] int64 (image row of each caption).
Metadata: {"domains": JSON list in stream order, "phase": P, "step": S, "model": name}, plus the
writer's extra keys (the trainer: "strategy"; a fine trace also "fine": "1" and "trace_size": n).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save, safe_open

from .io import atomic_write


@dataclass
class DomainEmbeddings:
    image: torch.Tensor           # [N, d]
    text: torch.Tensor            # [M, d]
    ids: torch.Tensor             # [N] int64
    caption_image: torch.Tensor | None = None  # [M] int64, None when M == N and caption i is image i

    def head(self, n: int) -> "DomainEmbeddings":
        """The rows of the first `n` images and of their captions: what a fine trace of the same
        probe set holds (ProbeSet.head)."""
        if self.caption_image is None:
            return DomainEmbeddings(self.image[:n], self.text[:n], self.ids[:n])
        keep = self.caption_image < n
        return DomainEmbeddings(self.image[:n], self.text[keep], self.ids[:n], self.caption_image[keep])


@dataclass
class Trace:
    domains: dict[str, DomainEmbeddings]  # in stream order
    phase: int
    step: int
    model: str
    extra: dict = field(default_factory=dict)


def stored(emb: DomainEmbeddings) -> DomainEmbeddings:
    """`emb` as a trace file holds it (float16 rows, int64 indices, on the CPU): what a reader of the
    trace measures."""
    # clone: safetensors refuses tensors that share memory (e.g. one caption_image for two domains)
    return DomainEmbeddings(
        image=emb.image.detach().to("cpu", torch.float16).clone(),
        text=emb.text.detach().to("cpu", torch.float16).clone(), ids=emb.ids.detach().to("cpu", torch.int64).clone(),
        caption_image=None if emb.caption_image is None else emb.caption_image.detach().to("cpu", torch.int64).clone())


def write_trace(path, trace: Trace, durable: bool = True) -> None:
    """`trace` as safetensors at `path`, atomically (durable: atomic_write's)."""
    tensors = {}
    for name, emb in trace.domains.items():
        emb = stored(emb)
        tensors[f"{name}.image"], tensors[f"{name}.text"], tensors[f"{name}.ids"] = emb.image, emb.text, emb.ids
        if emb.caption_image is not None:
            tensors[f"{name}.caption_image"] = emb.caption_image
    metadata = {"domains": json.dumps(list(trace.domains)), "phase": str(trace.phase),
                "step": str(trace.step), "model": trace.model}
    metadata.update({k: str(v) for k, v in trace.extra.items()})
    data = save(tensors, metadata=metadata)
    atomic_write(path, lambda f: f.write(data), durable=durable)


def read_trace(path) -> Trace:
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{path}: not a readable safetensors trace ({e})") from e
    for key in ("domains", "phase", "step", "model"):
        if key not in meta:
            raise ValueError(f"{path}: trace metadata lacks {key!r} (expected domains, phase, step, model)")
    domains = {}
    for name in json.loads(meta["domains"]):
        try:
            domains[name] = DomainEmbeddings(
                image=tensors[f"{name}.image"], text=tensors[f"{name}.text"], ids=tensors[f"{name}.ids"],
                caption_image=tensors.get(f"{name}.caption_image"))
        except KeyError as e:
            raise ValueError(f"{path}: trace lacks tensor {e.args[0]!r}") from e
    extra = {k: v for k, v in meta.items() if k not in ("domains", "phase", "step", "model")}
    return Trace(domains=domains, phase=int(meta["phase"]), step=int(meta["step"]), model=meta["model"], extra=extra)
