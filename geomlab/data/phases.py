"""The "datasets" stream: phases and probe sets built from real image-text sources.

Config (geomlab.config SCHEMA, experiments/README.md):

    [data]
    stream = "datasets"
    root = "/data"                  # relative source paths resolve against it
    probe_size = 0                  # probe images per probe set: the first N (0 = all)
    on_bad_sample = "error"         # or "skip"
    [data.datasets]
    train_captions = "all"          # every caption is a training pair ("first", "random": one per image)
    augment = false                 # open_clip's random-crop training transform
    verify_images = false           # decode every image up front
    [[data.sources]]                # one table per source, in phase order
    name = "flickr30k"; format = "karpathy"; path = "flickr30k/dataset_flickr30k.json"
    images = "flickr30k/images"; splits = ["train"]; role = "train"; k = 5

Phases are the train sources in order, each contributing `k` phases (its images split by index
into k contiguous parts of equal size, ±1; `shuffle = true` applies a seeded permutation first) or,
with `key`, one phase per value of that column (order `key_values`, default sorted). So one source
with k = 5 is the paper's Flickr30K five-phase setting, two sources with k = 1 are a sequence
(COCO → Flickr30K), and one source with key = "domain" is a split by a key column; they combine.
Probe sources (role = "probe") give one probe set each (or one per key value), every caption kept.
Phase 0 (the first phase) trains the base model.
"""
from __future__ import annotations

import hashlib
import os
import re
import sys
from pathlib import Path

import torch

from . import DataError, Phase, ProbeSet, Stream, register_stream
from .readers import (SOURCE_STRIDE, Bad, ImageDataset, PairDataset, probe_parts, read_coco, read_csv,
                      read_karpathy, read_wds, resolve_transforms, verify_records)

VERSION = 1


def _path(root: Path, p: str) -> Path:
    q = Path(p).expanduser()
    return q if q.is_absolute() else root / q


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_") or "x"


def read_source(src: dict, root: Path, bad: Bad) -> list:
    fmt, name = src["format"], src["name"]
    where = f"data.sources[{name!r}]"
    if not src["path"]:
        raise DataError(f"{where}: path is not set")
    if fmt in ("coco", "karpathy") and not src["images"]:
        raise DataError(f"{where}: images (the image folder) is not set")
    if src["key"] and fmt == "wds" and src["key"] == src["caption_ext"]:
        raise DataError(f"{where}: key cannot be the caption member")
    path = _path(root, src["path"])
    images = _path(root, src["images"]) if src["images"] else None
    if fmt == "coco":
        return read_coco(path, images, source=name, bad=bad, key=src["key"])
    if fmt == "karpathy":
        return read_karpathy(path, images, splits=src["splits"], source=name, bad=bad, key=src["key"])
    if fmt == "csv":
        return read_csv(path, images, img_key=src["img_key"], caption_key=src["caption_key"],
                        separator=src["separator"], source=name, bad=bad, key=src["key"])
    if fmt == "wds":
        return read_wds(src["path"], root, image_ext=src["image_ext"], caption_ext=src["caption_ext"],
                        source=name, bad=bad, key=src["key"])
    raise DataError(f"{where}: format must be one of coco, karpathy, csv, wds, got {fmt!r}")


def split_records(records: list, src: dict, seed: int, source_index: int) -> tuple[list[tuple[str, list]], dict]:
    """[(part name, records)] and what was done (for Stream.info)."""
    name = src["name"]
    if src["key"]:
        values = list(src["key_values"]) or sorted({r.key for r in records})
        unknown = sorted({r.key for r in records} - set(values))
        if unknown:
            raise DataError(f"data.sources[{name!r}]: key {src['key']!r} has values {unknown[:5]} "
                            f"not in key_values {values}")
        parts = [(f"{name}_{_safe(v)}", [r for r in records if r.key == v]) for v in values]
        info = {"split": "key", "key": src["key"], "values": values}
    else:
        k = src["k"]
        if k < 1:
            raise DataError(f"data.sources[{name!r}]: k must be >= 1, got {k}")
        order = list(range(len(records)))
        if src["shuffle"]:
            g = torch.Generator().manual_seed(seed * 1_000_003 + source_index)
            order = torch.randperm(len(records), generator=g).tolist()
        n = len(order)
        bounds = [n * p // k for p in range(k + 1)]
        parts = [(name if k == 1 else f"{name}_{p + 1}of{k}", [records[i] for i in order[bounds[p]:bounds[p + 1]]])
                 for p in range(k)]
        info = {"split": "index", "k": k, "shuffle": bool(src["shuffle"]),
                "bounds": bounds, "order_sha1": hashlib.sha1(str(order).encode()).hexdigest()[:16]}
    for pname, recs in parts:
        if not recs:
            raise DataError(f"data.sources[{name!r}]: part {pname!r} has no images ({len(records)} in the source)")
    return parts, info


@register_stream("datasets")
def build(data: dict, *, image_size: int, preprocess=None, seed: int = 0) -> Stream:
    opts = data.get("datasets", {}) or {}
    sources = data.get("sources", []) or []
    policy = data.get("on_bad_sample", "error")
    captions = opts.get("train_captions", "all")
    augment, verify = bool(opts.get("augment", False)), bool(opts.get("verify_images", False))
    probe_size = int(data.get("probe_size", 0))
    root = Path(data.get("root", "") or ".").expanduser()
    if not sources:
        raise DataError("data.stream = \"datasets\" needs at least one [[data.sources]] table")
    names = [s["name"] for s in sources]
    if any(not n for n in names) or len(set(names)) != len(names):
        raise DataError(f"data.sources: every source needs a distinct name, got {names}")
    if not any(s["role"] == "train" for s in sources) or not any(s["role"] == "probe" for s in sources):
        raise DataError("data.sources: need at least one source with role = \"train\" and one with role = \"probe\"")
    tf = resolve_transforms(preprocess, image_size)
    bad = Bad(policy)
    phases, probes, info_sources = [], [], []
    train_images, probe_images = {}, {}
    for si, src in enumerate(sources):
        records = read_source(src, root, bad)
        if src["limit"] > 0:
            records = records[: src["limit"]]
        if verify or policy == "skip":
            records = verify_records(records, source=src["name"], bad=bad)
        for ordinal, r in enumerate(records):
            r.uid = si * SOURCE_STRIDE + ordinal
        if src["role"] == "train":
            parts, how = split_records(records, src, seed, si)
            for pname, recs in parts:
                phases.append(Phase(name=pname, train=PairDataset(
                    recs, tf["train"] if augment else tf["val"], source=src["name"], captions=captions)))
            train_images.update({os.path.normpath(r.where()): src["name"] for r in records})
        else:
            if src["key"]:
                parts, how = split_records(records, src, seed, si)
            else:
                parts, how = [(_safe(src["name"]), records)], {"split": "none"}
            for pname, recs in parts:
                recs = recs[:probe_size] if probe_size > 0 else recs
                caps, owner, ids = probe_parts(recs)
                probes.append(ProbeSet(name=pname, images=ImageDataset(recs, tf["val"], source=src["name"]),
                                       captions=caps, caption_image=owner, ids=ids))
                probe_images.update({os.path.normpath(r.where()): src["name"] for r in recs})
        info_sources.append({"name": src["name"], "format": src["format"], "role": src["role"],
                             "path": str(_path(root, src["path"])) if src["format"] != "wds" else src["path"],
                             "images": len(records), "captions": sum(len(r.captions) for r in records), **how})
    overlap = sorted(set(train_images) & set(probe_images))
    if overlap:
        raise DataError(f"{overlap[0]}: image is in both train source {train_images[overlap[0]]!r} and probe "
                        f"source {probe_images[overlap[0]]!r} ({len(overlap)} shared); probes must be held out")
    if bad.skipped:
        print(f"geomlab.data: skipped {len(bad.skipped)} bad record(s) (data.on_bad_sample = \"skip\")",
              file=sys.stderr)
    info = {"stream": "datasets", "version": VERSION, "seed": seed, "image_size": int(image_size),
            "train_captions": captions, "augment": augment, "verified_images": verify or policy == "skip",
            "probe_size": probe_size, "sources": info_sources,
            "phases": [{"name": p.name, "images": p.train.n_images, "pairs": len(p.train)} for p in phases],
            "probe_sets": [{"name": p.name, "images": len(p.ids), "captions": len(p.captions)} for p in probes],
            "skipped": len(bad.skipped)}
    return Stream(phases=phases, probes=probes, info=info, skipped=bad.skipped)
