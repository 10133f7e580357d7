"""Readers of real image-text data: COCO captions, Karpathy-split JSON, CSV/TSV lists,
webdataset tar shards.

Every reader turns its source into a list of `Record`s: one per image, holding where the image is
(a file, or a member of a tar shard), every caption of that image, a human-readable reference for
error messages ("image id 42", "line 7", "key 000123") and, when asked for, the value of a key
column. Only cheap checks are made here (keys, columns, UTF-8, empty captions, that image files
exist); images are opened lazily by the datasets below, inside DataLoader workers, unless
`verify_records` decodes them up front.

Bad input is reported through a `Bad` collector: with on_bad_sample="error" the first bad record
raises `DataError` naming the file and the record; with "skip" the record is dropped, logged on
stderr and kept in the list that ends up in `Stream.skipped` and run.json.
"""
from __future__ import annotations

import csv
import io
import json
import os
import sys
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

from . import DataError

MAX_CAPTIONS = 1000  # training pair id = image uid * MAX_CAPTIONS + caption index
SOURCE_STRIDE = 10 ** 9  # image uid = source index * SOURCE_STRIDE + image ordinal in its source


@dataclass
class Record:
    image: str                       # image file, or the tar shard holding it
    captions: list[str]
    ref: str                         # "image id 42", "line 7", "key 000123": names the record
    key: str | None = None           # value of the source's key column, when one is set
    offset: int = -1                 # tar shards: byte offset and size of the image member
    size: int = 0
    member: str = ""                 # tar shards: the image member's name
    uid: int = -1                    # stream-wide image id (set by the stream builder)

    def where(self) -> str:
        return f"{self.image}:{self.member}" if self.member else self.image


@dataclass
class Bad:
    """Collects bad records under a policy ("error" raises at the first, "skip" counts)."""
    policy: str = "error"
    skipped: list = field(default_factory=list)
    quiet: bool = False

    def __call__(self, source: str, file, ref: str, reason: str) -> None:
        message = f"{file}: {ref}: {reason}"
        if self.policy != "skip":
            raise DataError(message + " (set data.on_bad_sample=\"skip\" to skip bad records)")
        self.skipped.append({"source": source, "file": str(file), "record": ref, "reason": reason})
        if not self.quiet:
            print(f"geomlab.data: skipped {message}", file=sys.stderr)


# ----------------------------------------------------------------------------- helpers

def _read_text(path: Path, what: str) -> str:
    if not path.is_file():
        raise DataError(f"{path}: {what} does not exist")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line} (byte {e.start}): text is not UTF-8") from None


def _load_json(path: Path, what: str):
    text = _read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None


def _require(obj, keys, path, where):
    if not isinstance(obj, dict):
        raise DataError(f"{path}: {where}: expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in keys if k not in obj]
    if missing:
        have = ", ".join(sorted(map(str, obj))[:12]) or "none"
        raise DataError(f"{path}: {where}: missing key(s) {', '.join(map(repr, missing))} (has: {have})")


def _clean_captions(captions, source, path, ref, bad: Bad) -> list[str]:
    out = []
    for j, c in enumerate(captions):
        if not isinstance(c, str) or not c.strip():
            bad(source, path, f"{ref} caption {j}", f"empty caption {c!r}")
        elif any("\udc80" <= ch <= "\udcff" for ch in c):
            bad(source, path, f"{ref} caption {j}", "caption is not UTF-8")
        else:
            out.append(" ".join(c.split()))
    return out


def _finish(records, source, path, bad: Bad, check_files: bool = True) -> list[Record]:
    """Drop records without captions or (when files are checked) without their image file."""
    out = []
    for r in records:
        if not r.captions:
            bad(source, path, r.ref, "no non-empty caption")
        elif check_files and not os.path.isfile(r.image):
            bad(source, r.image, r.ref, "image file does not exist")
        elif len(r.captions) >= MAX_CAPTIONS:
            bad(source, path, r.ref, f"more than {MAX_CAPTIONS - 1} captions")
        else:
            out.append(r)
    return out


def _key_value(obj: dict, key: str, path, ref) -> str | None:
    if not key:
        return None
    if key not in obj:
        raise DataError(f"{path}: {ref}: no key field {key!r} (the source's key)")
    return str(obj[key])


# ----------------------------------------------------------------------------- readers

def read_coco(path: Path, images: Path, *, source: str, bad: Bad, key: str = "") -> list[Record]:
    """COCO captions annotation JSON (captions_train2017.json): images[{id, file_name}],
    annotations[{image_id, caption}]; image files under `images`."""
    data = _load_json(path, "COCO annotation file")
    _require(data, ["images", "annotations"], path, "top level")
    records, by_id = [], {}
    for n, im in enumerate(data["images"]):
        _require(im, ["id", "file_name"], path, f"images[{n}]")
        r = Record(image=str(images / im["file_name"]), captions=[], ref=f"image id {im['id']}",
                   key=_key_value(im, key, path, f"images[{n}]"))
        by_id[im["id"]] = r
        records.append(r)
    for n, ann in enumerate(data["annotations"]):
        _require(ann, ["image_id", "caption"], path, f"annotations[{n}]")
        r = by_id.get(ann["image_id"])
        if r is None:
            bad(source, path, f"annotations[{n}]", f"refers to unknown image id {ann['image_id']!r}")
            continue
        r.captions.extend(_clean_captions([ann["caption"]], source, path, f"{r.ref} (annotations[{n}])", bad))
    return _finish(records, source, path, bad)


def read_karpathy(path: Path, images: Path, *, splits, source: str, bad: Bad, key: str = "") -> list[Record]:
    """Karpathy-split JSON (dataset_flickr30k.json, dataset_coco.json): images[{filename, [filepath],
    split, sentences[{raw}], imgid}]; image file = images / [filepath /] filename."""
    data = _load_json(path, "Karpathy split file")
    _require(data, ["images"], path, "top level")
    splits = set(splits)
    records = []
    for n, im in enumerate(data["images"]):
        _require(im, ["filename", "split", "sentences"], path, f"images[{n}]")
        if im["split"] not in splits:
            continue
        ref = f"images[{n}] (imgid {im.get('imgid', n)}, {im['filename']})"
        sentences = []
        for j, s in enumerate(im["sentences"]):
            if isinstance(s, dict) and "raw" in s:
                sentences.append(s["raw"])
            elif isinstance(s, dict) and "tokens" in s:
                sentences.append(" ".join(s["tokens"]))
            else:
                raise DataError(f"{path}: {ref} sentences[{j}]: missing key 'raw'")
        folder = images / im["filepath"] if im.get("filepath") else images
        records.append(Record(image=str(folder / im["filename"]), ref=ref, key=_key_value(im, key, path, ref),
                              captions=_clean_captions(sentences, source, path, ref, bad)))
    return _finish(records, source, path, bad)


def read_csv(path: Path, images: Path | None, *, img_key: str, caption_key: str, separator: str,
             source: str, bad: Bad, key: str = "") -> list[Record]:
    """CSV/TSV with a header (open_clip's `--csv-img-key filepath --csv-caption-key title`). Rows that
    name the same image are one image with several captions. Relative image paths resolve against
    `images`, or the CSV's own folder."""
    if not path.is_file():
        raise DataError(f"{path}: CSV file does not exist")
    sep = separator or ("\t" if path.suffix.lower() in (".tsv", ".tab") else ",")
    text = path.read_bytes().decode("utf-8-sig", errors="surrogateescape")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=sep)
    header = next(reader, None)
    if header is None:
        raise DataError(f"{path}: empty CSV file (expected a header with {img_key!r} and {caption_key!r})")
    for col, what in ((img_key, "img_key"), (caption_key, "caption_key")) + (((key, "key"),) if key else ()):
        if col not in header:
            raise DataError(f"{path}: line 1: no column {col!r} (set by {what}); columns: "
                            f"{', '.join(map(repr, header))} (separator {sep!r})")
    ci, ti, ki = header.index(img_key), header.index(caption_key), header.index(key) if key else None
    folder = images if images is not None else path.parent
    records, by_image = [], {}
    for row in reader:
        ref = f"line {reader.line_num}"
        if not row or all(not f.strip() for f in row):
            continue
        if any("\udc80" <= ch <= "\udcff" for f in row for ch in f):
            bad(source, path, ref, "text is not UTF-8")
            continue
        if len(row) != len(header):
            bad(source, path, ref, f"{len(row)} fields, the header has {len(header)}")
            continue
        name = row[ci].strip()
        if not name:
            bad(source, path, ref, f"empty {img_key!r}")
            continue
        caps = _clean_captions([row[ti]], source, path, ref, bad)
        r = by_image.get(name)
        if r is None:
            r = by_image[name] = Record(image=str(folder / name), captions=[], ref=f"{ref} ({name})",
                                        key=row[ki] if ki is not None else None)
            records.append(r)
        r.captions.extend(caps)
    return _finish(records, source, path, bad)


def expand_shards(pattern: str, root: Path) -> list[Path]:
    from braceexpand import braceexpand
    out = []
    for p in braceexpand(pattern):
        q = Path(p)
        out.append(q if q.is_absolute() else root / q)
    return out


def read_wds(pattern: str, root: Path, *, image_ext, caption_ext: str, source: str, bad: Bad,
             key: str = "") -> list[Record]:
    """webdataset shards: samples grouped by webdataset's key convention (`base_plus_ext`); the image
    is the first member with an extension in `image_ext`, captions are the lines of the
    `caption_ext` member. Shards are indexed once (member offsets); images are read lazily."""
    from webdataset.tariterators import base_plus_ext
    image_ext = [e.lower() for e in image_ext]
    records = []
    for shard in expand_shards(pattern, root):
        if not shard.is_file():
            raise DataError(f"{shard}: webdataset shard does not exist")
        try:
            with tarfile.open(shard, "r:") as tar:
                members = [m for m in tar.getmembers() if m.isfile()]
        except tarfile.TarError as e:
            raise DataError(f"{shard}: not a readable tar shard ({e})") from None
        samples: dict = {}
        for m in members:
            base, ext = base_plus_ext(m.name)
            if base is None or Path(m.name).name.startswith("."):
                continue
            samples.setdefault(base, {})[ext.lower()] = m
        with open(shard, "rb") as f:
            for base, parts in samples.items():
                ref = f"key {base}"
                img = next((parts[e] for e in image_ext if e in parts), None)
                if img is None:
                    bad(source, shard, ref, f"no image member (extensions {', '.join(image_ext)})")
                    continue
                texts = {}
                for ext in [caption_ext] + ([key] if key else []):
                    m = parts.get(ext.lower())
                    if m is None:
                        texts[ext] = None
                        continue
                    f.seek(m.offset_data)
                    texts[ext] = f.read(m.size).decode("utf-8", errors="surrogateescape")
                if texts[caption_ext] is None:
                    bad(source, shard, ref, f"no caption member .{caption_ext}")
                    continue
                if key and texts[key] is None:
                    raise DataError(f"{shard}: {ref}: no member .{key} (the source's key)")
                lines = [ln for ln in texts[caption_ext].splitlines() if ln.strip()] or [""]
                records.append(Record(image=str(shard), member=img.name, offset=img.offset_data, size=img.size,
                                      ref=ref, key=texts[key].strip() if key else None,
                                      captions=_clean_captions(lines, source, shard, ref, bad)))
    return _finish(records, source, pattern, bad, check_files=False)


# ----------------------------------------------------------------------------- images

_IMAGE_ERRORS = (OSError, SyntaxError, ValueError)  # PIL: UnidentifiedImageError, truncated, decompression bomb


def _decode(record: Record):
    from PIL import Image
    if record.offset >= 0:
        with open(record.image, "rb") as f:
            f.seek(record.offset)
            img = Image.open(io.BytesIO(f.read(record.size)))
    else:
        img = Image.open(record.image)
    img.load()
    return img.convert("RGB")


def _reason(e: Exception) -> str:
    return f"unreadable image ({type(e).__name__}: {e})"


def open_image(record: Record, source: str = ""):
    """The record's image as an RGB PIL image; DataError naming file and record if it cannot be read."""
    try:
        return _decode(record)
    except _IMAGE_ERRORS as e:
        of = f" of source {source!r}" if source else ""
        raise DataError(f"{record.where()}: {record.ref}{of}: {_reason(e)}") from None


def verify_records(records: list[Record], *, source: str, bad: Bad, threads: int = 2) -> list[Record]:
    """Decode every image once (threads: PIL releases the GIL while decoding); drop/raise on failures."""
    def check(r):
        try:
            _decode(r)
            return None
        except _IMAGE_ERRORS as e:
            return _reason(e)
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        errors = list(pool.map(check, records))
    out = []
    for r, err in zip(records, errors):
        if err is None:
            out.append(r)
        else:
            bad(source, r.where(), r.ref, err)
    return out


# ----------------------------------------------------------------------------- transforms

def resolve_transforms(preprocess, image_size: int) -> dict:
    """{"train", "val"} from what the trainer passes: such a dict, one callable for both, or None
    (open_clip's default transforms at `image_size`)."""
    if isinstance(preprocess, dict):
        return {"train": preprocess["train"], "val": preprocess["val"]}
    if callable(preprocess):
        return {"train": preprocess, "val": preprocess}
    import open_clip
    return {"train": open_clip.image_transform(image_size, is_train=True),
            "val": open_clip.image_transform(image_size, is_train=False)}


# ----------------------------------------------------------------------------- datasets

class PairDataset(Dataset):
    """Training pairs of some records: item i -> (image tensor, caption, sample id = image uid * 1000
    + caption index). captions="all": every caption of every image is an item; "first": one item
    per image, its first caption; "random": one item per image, a caption drawn at each access from
    torch's RNG (the released Mod-X loader's `random.choice`). Images open lazily (in DataLoader workers)."""

    def __init__(self, records: list[Record], transform, *, source: str, captions: str = "all"):
        self.records, self.transform, self.source = records, transform, source
        if captions == "all":
            self.index = [(r, j) for r, rec in enumerate(records) for j in range(len(rec.captions))]
        else:
            self.index = [(r, 0 if captions == "first" else -1) for r in range(len(records))]

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        r, j = self.index[i]
        rec = self.records[r]
        if j < 0:
            j = int(torch.randint(len(rec.captions), ()).item())
        return self.transform(open_image(rec, self.source)), rec.captions[j], rec.uid * MAX_CAPTIONS + j

    @property
    def n_images(self) -> int:
        return len(self.records)


class ImageDataset(Dataset):
    """Probe images: item i -> image tensor (lazily opened)."""

    def __init__(self, records: list[Record], transform, *, source: str):
        self.records, self.transform, self.source = records, transform, source

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        return self.transform(open_image(self.records[i], self.source))


def probe_parts(records: list[Record]) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """(every caption, caption_image [M], image ids [N]) of probe records."""
    captions, owner = [], []
    for i, r in enumerate(records):
        captions.extend(r.captions)
        owner.extend([i] * len(r.captions))
    return captions, torch.tensor(owner, dtype=torch.int64), torch.tensor([r.uid for r in records], dtype=torch.int64)
