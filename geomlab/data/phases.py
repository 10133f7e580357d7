"""The "datasets" stream: phases and probe sets built from real image-text sources.

Config (geomlab.config SCHEMA, experiments/README.md):

    [data]
    stream = "datasets"
    root = "/data"                  # relative source paths resolve against it
    probe_size = 0                  # probe images per probe set: the first N (0 = all)
    calibration_size = 512          # calibration pairs per probe set: the last N of its part (0 = none)
    probe_cache_mb = 2048           # probe images, decoded once up front, kept in memory up to this
    on_bad_sample = "error"         # or "skip"
    [data.datasets]
    train_captions = "all"          # every caption is a training pair ("first", "random": one per image)
    augment = false                 # open_clip's random-crop training transform
    verify_images = false           # decode every training image up front (probe images always are)
    [[data.sources]]                # one table per source, in phase order
    name = "flickr30k"; format = "karpathy"; path = "flickr30k/dataset_flickr30k.json"
    images = "flickr30k/images"; splits = ["train"]; role = "train"; k = 5

Phases are the train sources in order, each contributing `k` phases (its images split by index
into k contiguous parts of equal size, ±1; `shuffle = true` applies a seeded permutation first) or,
with `key`, one phase per value of that column (order `key_values`, default sorted). So one source
with k = 5 is the paper's Flickr30K five-phase setting, two sources with k = 1 are a sequence
(COCO → Flickr30K), and one source with key = "domain" is a split by a key column; they combine.
Probe sources (role = "probe") give one probe set each (or one per key value), every caption kept.
A probe source's `measures` names the train source(s) whose data it measures: its probe sets are
learned at the last phase of those sources (a probe split by the same key as its train source: at
the phase of its own key value); without `measures` no phase trains on it. Each probe part's last
`calibration_size` records are its calibration set ("<part>/calibration", kind "calibration",
docs/definitions.md "Calibration split"), held out of the probe: the probe takes the first
`probe_size` of the records before them (all of them with probe_size = 0), and a part with too few
records for both is refused, naming the numbers. Calibration images are decoded and checked like
probe images and held out of training and of the reference set like them; the calibration sets
follow every probe set in the stream. `layout` gives phases and probe sets from the config alone.
Zero-shot sources (role = "zeroshot", format = "imagefolder": one sub-folder per class) are
classified at every checkpoint (geomlab.zeroshot).
Reference sources (role = "reference") pool into the stream's reference set, pairs held out from
every train and probe source (ZSCL distils on it): an image shared with a train or probe source, or a
caption shared with a probe set, is refused. Their distinct captions, in source order, are the
stream's reference text pool (Stream.reference_texts, ZSCL's sentences).
Phase 0 (the first phase) trains the base model.
"""
from __future__ import annotations

import hashlib
import os
import re
import sys
from pathlib import Path

import torch
from torch.utils.data import ConcatDataset

from . import (CALIBRATION_KIND, CALIBRATION_SIZE, SEEN_KIND, DataError, Phase, ProbeSet, Stream,
               calibration_name, register_stream)
from ..runtime import cpu_workers
from .imagefolder import imagefolder_set
from .readers import (SOURCE_STRIDE, Bad, PairDataset, load_probe_images, probe_parts, read_coco, read_csv,
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
        return read_coco(path, images, source=name, bad=bad, key=src["key"], limit=src["limit"])
    if fmt == "karpathy":
        return read_karpathy(path, images, splits=src["splits"], source=name, bad=bad, key=src["key"],
                             limit=src["limit"])
    if fmt == "csv":
        return read_csv(path, images, img_key=src["img_key"], caption_key=src["caption_key"],
                        separator=src["separator"], source=name, bad=bad, key=src["key"], limit=src["limit"])
    if fmt == "wds":
        return read_wds(src["path"], root, image_ext=src["image_ext"], caption_ext=src["caption_ext"],
                        source=name, bad=bad, key=src["key"], limit=src["limit"])
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
        parts = [(pname, [r for r in records if r.key == v]) for v, pname in part_names(src, values)]
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
        parts = [(pname, [records[i] for i in order[bounds[p]:bounds[p + 1]]])
                 for p, (_, pname) in enumerate(part_names(src))]
        info = {"split": "index", "k": k, "shuffle": bool(src["shuffle"]),
                "bounds": bounds, "order_sha1": hashlib.sha1(str(order).encode()).hexdigest()[:16]}
    for pname, recs in parts:
        if not recs:
            raise DataError(f"data.sources[{name!r}]: part {pname!r} has no images ({len(records)} in the source)")
    return parts, info


def split_calibration(records: list, probe_size: int, calibration_size: int, where: str) -> tuple[list, list]:
    """(probe records, calibration records) of one probe part: the calibration set is the part's last
    `calibration_size` records, the probe the first `probe_size` of those before them (0: all of them).
    Refuses (naming `where` and the numbers) a part too small for both."""
    if not calibration_size:
        return (records[:probe_size] if probe_size > 0 else records), []
    needed = calibration_size + max(probe_size, 1)
    if len(records) < needed:
        wanted = f"the probe's {probe_size}" if probe_size > 0 else "at least 1 for the probe"
        raise DataError(f"{where}: {len(records)} records, too few for data.calibration_size = {calibration_size} "
                        f"calibration pairs (its last records) and {wanted} before them (needs {needed}); "
                        "lower data.calibration_size (0 = no calibration set) or data.probe_size")
    rest = records[:-calibration_size]
    return (rest[:probe_size] if probe_size > 0 else rest), records[-calibration_size:]


def part_names(src: dict, values=None) -> list[tuple[str | None, str]]:
    """(key value or None, name) of each part a train or probe source splits into, in order: its
    phases or probe sets. `values`: the key's values (default: the source's key_values)."""
    name = src["name"]
    if src["key"]:
        return [(v, f"{name}_{_safe(v)}") for v in (src["key_values"] if values is None else values)]
    if src["role"] != "train":
        return [(None, _safe(name))]
    k = src["k"]
    return [(None, name if k == 1 else f"{name}_{p + 1}of{k}") for p in range(k)]


def check_measures(sources: list[dict]) -> None:
    """Each `measures` is on a probe source and names train sources."""
    train = [s["name"] for s in sources if s["role"] == "train"]
    for src in sources:
        where = f"data.sources[{src['name']!r}].measures"
        if src["measures"] and src["role"] != "probe":
            raise DataError(f"{where}: only a probe source (role = \"probe\") measures train sources")
        for m in src["measures"]:
            if m not in train:
                raise DataError(f"{where}: {m!r} is not a train source (train sources: {', '.join(train)})")


def probe_phases(sources: list[dict], parts: dict[str, list]) -> dict[str, tuple[int, ...]]:
    """Probe set name -> the phases that train on the data it measures. `parts`: source name ->
    `part_names` of every train and probe source (train sources' parts are the phases, in order)."""
    check_measures(sources)
    trained, first = {}, 0
    for src in sources:
        if src["role"] == "train":
            trained[src["name"]] = (src, [(v, first + i) for i, (v, _) in enumerate(parts[src["name"]])])
            first += len(parts[src["name"]])
    out = {}
    for src in sources:
        if src["role"] != "probe":
            continue
        for value, pname in parts[src["name"]]:
            phases = set()
            for m in src["measures"]:
                train_src, own = trained[m]
                by_value = value is not None and train_src["key"] == src["key"]
                phases.update(t for v, t in own if not by_value or v == value)
            out[pname] = tuple(sorted(phases))
    return out


def layout(data: dict) -> tuple[list[str], dict[str, tuple[int, ...]]]:
    """(phase names, probe set name -> its phases) of a "datasets" stream from its config alone; no
    data is read. A source split by a key needs its key_values (else its parts are the data's)."""
    sources = data.get("sources", []) or []
    parts = {}
    for src in sources:
        if src["role"] in ("train", "probe"):
            if src["key"] and not src["key_values"]:
                raise DataError(f"data.sources[{src['name']!r}]: split by key {src['key']!r} without key_values; "
                                "its parts are known only from the data")
            parts[src["name"]] = part_names(src)
    phases = [pname for src in sources if src["role"] == "train" for _, pname in parts[src["name"]]]
    return phases, probe_phases(sources, parts)


@register_stream("datasets")
def build(data: dict, *, image_size: int, preprocess=None, seed: int = 0) -> Stream:
    opts = data.get("datasets", {}) or {}
    sources = data.get("sources", []) or []
    policy = data.get("on_bad_sample", "error")
    captions = opts.get("train_captions", "all")
    augment, verify = bool(opts.get("augment", False)), bool(opts.get("verify_images", False))
    probe_size = int(data.get("probe_size", 0))
    calibration_size = int(data.get("calibration_size", CALIBRATION_SIZE))
    cache_left = int(data.get("probe_cache_mb", 0)) * 2 ** 20  # decoded probe images kept in memory (bytes)
    threads = cpu_workers(max(2, int(data.get("num_workers", 0))))  # up-front decoding
    root = Path(data.get("root", "") or ".").expanduser()
    if not sources:
        raise DataError("data.stream = \"datasets\" needs at least one [[data.sources]] table")
    names = [s["name"] for s in sources]
    if any(not n for n in names) or len(set(names)) != len(names):
        raise DataError(f"data.sources: every source needs a distinct name, got {names}")
    if not any(s["role"] == "train" for s in sources) or not any(s["role"] == "probe" for s in sources):
        raise DataError("data.sources: need at least one source with role = \"train\" and one with role = \"probe\"")
    check_measures(sources)
    for src in sources:
        if (src["role"] == "zeroshot") != (src["format"] == "imagefolder"):
            raise DataError(f"data.sources[{src['name']!r}]: format = \"imagefolder\" goes with role = \"zeroshot\" "
                            f"and only with it, got format {src['format']!r} and role {src['role']!r}")
    tf = resolve_transforms(preprocess, image_size)
    bad = Bad(policy)
    phases, probes, calibrations, zeroshot, info_sources, references = [], [], [], [], [], []
    train_images, probe_images, reference_images, parts_of = {}, {}, {}, {}
    probe_captions, reference_captions = {}, {}  # caption -> the (first) source holding it
    for si, src in enumerate(sources):
        if src["role"] == "zeroshot":
            zs, records = imagefolder_set(src, _path(root, src["path"]), tf["val"], bad, verify or policy == "skip")
            zeroshot.append(zs)
            probe_images.update({os.path.normpath(r.where()): src["name"] for r in records})
            info_sources.append({"name": src["name"], "format": src["format"], "role": src["role"],
                                 "path": str(_path(root, src["path"])), "images": len(records),
                                 "classes": zs.classes, "templates": zs.templates})
            continue
        records = read_source(src, root, bad)
        if (verify or policy == "skip") and src["role"] != "probe":  # probe images: decoded below, all of them
            records = verify_records(records, source=src["name"], bad=bad, threads=threads)
        for ordinal, r in enumerate(records):
            r.uid = si * SOURCE_STRIDE + ordinal
        if src["role"] == "reference":  # one reference set of every such source's pairs (ZSCL)
            references.append(PairDataset(records, tf["val"], source=src["name"], captions=captions))
            reference_images.update({os.path.normpath(r.where()): src["name"] for r in records})
            for r in records:
                for caption in r.captions:
                    reference_captions.setdefault(caption, src["name"])
            how = {"split": "none"}
        elif src["role"] == "train":
            parts, how = split_records(records, src, seed, si)
            parts_of[src["name"]] = part_names(src, how.get("values"))
            for pname, recs in parts:
                phases.append(Phase(name=pname, train=PairDataset(
                    recs, tf["train"] if augment else tf["val"], source=src["name"], captions=captions)))
            train_images.update({os.path.normpath(r.where()): src["name"] for r in records})
        else:
            if src["key"]:
                parts, how = split_records(records, src, seed, si)
            else:
                parts, how = [(_safe(src["name"]), records)], {"split": "none"}
            parts_of[src["name"]] = part_names(src, how.get("values"))
            for pname, recs in parts:
                probe_recs, calibration_recs = split_calibration(
                    recs, probe_size, calibration_size, f"data.sources[{src['name']!r}], probe set {pname!r}")
                for name, these, out, kind in ((pname, probe_recs, probes, SEEN_KIND),
                                               (calibration_name(pname), calibration_recs, calibrations,
                                                CALIBRATION_KIND)):
                    if not these:
                        continue
                    # decoded once now, only those used: a bad probe image stops the run before training
                    images = load_probe_images(these, tf["val"], source=src["name"], bad=bad, threads=threads,
                                               budget_bytes=cache_left)
                    cache_left -= images.pixels.numel() if images.in_memory else 0
                    caps, owner, ids = probe_parts(images.records)
                    out.append(ProbeSet(name=name, images=images, captions=caps, caption_image=owner, ids=ids,
                                        kind=kind))
                    # calibration pairs are held out of training and of the reference set like the probe's
                    probe_images.update({os.path.normpath(r.where()): src["name"] for r in images.records})
                    for caption in caps:
                        probe_captions.setdefault(caption, src["name"])
        info_sources.append({"name": src["name"], "format": src["format"], "role": src["role"],
                             "path": str(_path(root, src["path"])) if src["format"] != "wds" else src["path"],
                             "images": len(records), "captions": sum(len(r.captions) for r in records), **how})
    measured = probe_phases(sources, parts_of)
    for p in probes:
        p.phases = measured[p.name]
    phases_of = {calibration_name(p.name): p.phases for p in probes}
    for c in calibrations:  # a calibration set holds its probe set's data: the same phases train on it
        c.phases = phases_of[c.name]
    probes += calibrations  # after every probe set: the probe sets keep their places
    overlap = sorted(set(train_images) & set(probe_images))
    if overlap:
        raise DataError(f"{overlap[0]}: image is in both train source {train_images[overlap[0]]!r} and probe "
                        f"source {probe_images[overlap[0]]!r} ({len(overlap)} shared); probes must be held out")
    for other, held in ((train_images, "train"), (probe_images, "probe")):
        overlap = sorted(set(reference_images) & set(other))
        if overlap:
            raise DataError(f"{overlap[0]}: image is in both reference source {reference_images[overlap[0]]!r} "
                            f"and {held} source {other[overlap[0]]!r} ({len(overlap)} shared); the reference "
                            "set must be held out")
    shared = [c for c in reference_captions if c in probe_captions]
    if shared:
        raise DataError(f"caption {shared[0]!r} is in both reference source {reference_captions[shared[0]]!r} and "
                        f"probe source {probe_captions[shared[0]]!r} ({len(shared)} shared); the reference set "
                        "must be held out")
    if bad.skipped:
        print(f"geomlab.data: skipped {len(bad.skipped)} bad record(s) (data.on_bad_sample = \"skip\")",
              file=sys.stderr)
    info = {"stream": "datasets", "version": VERSION, "seed": seed, "image_size": int(image_size),
            "train_captions": captions, "augment": augment, "verified_images": verify or policy == "skip",
            "probe_size": probe_size, "calibration_size": calibration_size, "sources": info_sources,
            "phases": [{"name": p.name, "images": p.train.n_images, "pairs": len(p.train)} for p in phases],
            "probe_sets": [{"name": p.name, "images": len(p.ids), "captions": len(p.captions),
                            "phases": list(p.phases), "kind": p.kind} for p in probes],
            "zeroshot_sets": [{"name": z.name, "images": len(z.labels), "classes": len(z.classes)} for z in zeroshot],
            "skipped": len(bad.skipped)}
    return Stream(phases=phases, probes=probes, info=info, skipped=bad.skipped, zeroshot=zeroshot,
                  reference=ConcatDataset(references) if references else None,
                  reference_texts=list(reference_captions))
