"""Readers of real image-text data: COCO captions, Karpathy-split JSON, CSV/TSV lists,
webdataset tar shards.

Every reader turns its source into a list of `Record`s: one per image, holding where the image is
(a file, or a member of a tar shard), every caption of that image, a human-readable reference for
error messages ("image id 42", "line 7", "key 000123") and, when asked for, the value of a key
column. Only cheap checks are made here (keys, columns, UTF-8, empty captions, that image files
exist, that tar shards are whole), record by record in file order and only up to `limit` records;
training images are opened lazily by the datasets below, inside DataLoader workers, unless
`verify_records` decodes them up front; probe images are decoded once up front by
`load_probe_images`.

Bad input is reported through a `Bad` collector, once per bad input: with on_bad_sample="error" the
first bad record raises `DataError` naming the file and the record; with "skip" the record is
dropped, logged on stderr and kept in the list that ends up in `Stream.skipped` and run.json.
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
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import Compose, Normalize, ToTensor
from torchvision.transforms.functional import pil_to_tensor

from . import DataError

MAX_CAPTIONS = 1000  # training pair id = image uid * MAX_CAPTIONS + caption index
SOURCE_STRIDE = 10 ** 9  # image uid = source index * SOURCE_STRIDE + image ordinal in its source
SKIP_HINT = " (set data.on_bad_sample=\"skip\" to skip bad records)"
TAR_BLOCK = 512


@dataclass
class Record:
    image: str                       # image file, or the tar shard holding it
    captions: list[str]              # the clean captions (readers fill `raw`; `_finish` cleans it)
    ref: str                         # "image id 42", "line 7", "key 000123": names the record
    key: str | None = None           # value of the source's key column, when one is set
    offset: int = -1                 # tar shards: byte offset and size of the image member
    size: int = 0
    member: str = ""                 # tar shards: the image member's name
    uid: int = -1                    # stream-wide image id (set by the stream builder)
    raw: list = field(default_factory=list, repr=False)  # (caption as read, its ref for messages)

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
            raise DataError(message + SKIP_HINT)
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


def _clean_captions(record: Record, source, path, bad: Bad) -> None:
    """Clean `record.raw` into `record.captions`; each bad caption is reported (and dropped) once."""
    for c, ref in record.raw:
        if not isinstance(c, str) or not c.strip():
            bad(source, path, ref, f"empty caption {c!r}")
        elif any("\udc80" <= ch <= "\udcff" for ch in c):
            bad(source, path, ref, "caption is not UTF-8")
        else:
            record.captions.append(" ".join(c.split()))


def _finish(records, source, path, bad: Bad, limit: int = 0, check_files: bool = True) -> list[Record]:
    """Check records in order until `limit` good ones (0 = all): records past the limit are never
    checked, so a partial download serves a run that uses its first images. A record is dropped when
    its image file is missing (when files are checked), or when it has no usable caption; each bad
    input is reported once (a record whose captions were all reported bad is not reported again)."""
    out = []
    for r in records:
        if limit and len(out) >= limit:
            break
        if check_files and not os.path.isfile(r.image):
            # the image, its record in the annotation / caption file, and the source
            bad(source, r.image, f"{r.ref} of {path}", f"image file does not exist (source {source!r})")
            continue
        _clean_captions(r, source, path, bad)
        if not r.captions:
            if not r.raw:
                bad(source, path, r.ref, "no caption")
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

def read_coco(path: Path, images: Path, *, source: str, bad: Bad, key: str = "", limit: int = 0) -> list[Record]:
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
        r.raw.append((ann["caption"], f"{r.ref} (annotations[{n}])"))
    return _finish(records, source, path, bad, limit)


def read_karpathy(path: Path, images: Path, *, splits, source: str, bad: Bad, key: str = "",
                  limit: int = 0) -> list[Record]:
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
        records.append(Record(image=str(folder / im["filename"]), captions=[], ref=ref,
                              key=_key_value(im, key, path, ref),
                              raw=[(c, f"{ref} caption {j}") for j, c in enumerate(sentences)]))
    return _finish(records, source, path, bad, limit)


def read_csv(path: Path, images: Path | None, *, img_key: str, caption_key: str, separator: str,
             source: str, bad: Bad, key: str = "", limit: int = 0) -> list[Record]:
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
        r = by_image.get(name)
        if r is None:
            r = by_image[name] = Record(image=str(folder / name), captions=[], ref=f"{ref} ({name})",
                                        key=row[ki] if ki is not None else None)
            records.append(r)
        r.raw.append((row[ti], ref))
    return _finish(records, source, path, bad, limit)


def expand_shards(pattern: str, root: Path) -> list[Path]:
    from braceexpand import braceexpand
    out = []
    for p in braceexpand(pattern):
        q = Path(p)
        out.append(q if q.is_absolute() else root / q)
    return out


def _truncation(shard: Path, size: int, members: list, stop: int | None, error: str) -> str | None:
    """Where a tar shard is cut short, or None when it is whole: tar's end-of-archive block (512 zero
    bytes) follows its last member. `stop`: where tarfile stopped reading headers; None when it
    failed with `error`."""
    for m in members:
        if m.offset_data + m.size > size:
            return (f"cut inside the data of member {m.name} (it needs bytes {m.offset_data}..{m.offset_data + m.size}"
                    f", the file has {size})")
    if stop is None:
        return f"unreadable after member {members[-1].name} ({error}; the file has {size} bytes)"
    with open(shard, "rb") as f:
        f.seek(stop)
        block = f.read(TAR_BLOCK)
    if len(block) == TAR_BLOCK and not any(block):
        return None
    if not block:
        return f"ends at byte {stop} without tar's end-of-archive block"
    if len(block) < TAR_BLOCK:  # Python's tarfile stops here without a word
        return f"cut inside a member header at byte {stop} (the file size {size} is not a multiple of {TAR_BLOCK})"
    return f"unreadable member header at byte {stop}"


def _index_shard(shard: Path) -> tuple[list, str | None]:
    """(the whole file members of a tar shard, in order; where it is cut short, or None)."""
    size = shard.stat().st_size
    members, stop, error = [], None, ""
    try:
        with tarfile.open(shard, "r:") as tar:
            for m in tar:  # iterating keeps the members read before a failure
                members.append(m)
            stop = tar.offset
    except tarfile.TarError as e:
        if not members and (size < TAR_BLOCK or size % TAR_BLOCK):  # cut before its first member was whole
            return [], f"cut inside its first member header (the file has {size} bytes)" if size else "empty file"
        if not members:
            raise DataError(f"{shard}: not a readable tar shard ({e})") from None
        error = str(e)
    cut = _truncation(shard, size, members, stop, error) if members else None
    return [m for m in members if m.isfile() and m.offset_data + m.size <= size], cut


def read_wds(pattern: str, root: Path, *, image_ext, caption_ext: str, source: str, bad: Bad,
             key: str = "", limit: int = 0) -> list[Record]:
    """webdataset shards: samples grouped by webdataset's key convention (`base_plus_ext`); the image
    is the first member with an extension in `image_ext`, captions are the lines of the
    `caption_ext` member. Shards are indexed once (member offsets), in order, until `limit` samples;
    images are read lazily. A shard cut short (Python's tarfile stops quietly at a cut inside a
    member header) is one bad record, its rest, naming its last complete member: the samples before
    the cut are kept, the last one only when it has every member the reader uses."""
    from webdataset.tariterators import base_plus_ext
    image_ext = [e.lower() for e in image_ext]
    needed = [caption_ext.lower()] + ([key.lower()] if key else [])
    records = []
    for shard in expand_shards(pattern, root):
        if limit and len(records) >= limit:
            break
        if not shard.is_file():
            raise DataError(f"{shard}: webdataset shard does not exist")
        members, cut = _index_shard(shard)
        samples: dict = {}
        for m in members:
            base, ext = base_plus_ext(m.name)
            if base is None or Path(m.name).name.startswith("."):
                continue
            samples.setdefault(base, {})[ext.lower()] = m
        last_key = next(reversed(samples), None)
        if cut and last_key is not None and (not any(e in samples[last_key] for e in image_ext)
                                             or not all(e in samples[last_key] for e in needed)):
            del samples[last_key]  # the cut took some of its members: it is part of the rest
            rest = f"from key {last_key} on"
        else:
            rest = f"after key {last_key}" if last_key is not None else "every sample"
        with open(shard, "rb") as f:
            for base, parts in samples.items():
                if limit and len(records) >= limit:
                    break
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
                lines = [ln for ln in texts[caption_ext].splitlines() if ln.strip()]
                if not lines:
                    bad(source, shard, ref, f"empty caption member .{caption_ext}")
                    continue
                if key and texts[key] is None:
                    raise DataError(f"{shard}: {ref}: no member .{key} (the source's key)")
                record = Record(image=str(shard), captions=[], member=img.name, offset=img.offset_data,
                                size=img.size, ref=ref, key=texts[key].strip() if key else None,
                                raw=[(ln, f"{ref} caption {j}") for j, ln in enumerate(lines)])
                records += _finish([record], source, shard, bad, check_files=False)
            else:  # every sample read (the limit not reached): a cut loses the rest
                if cut:
                    last = members[-1].name if members else "none"
                    bad(source, shard, rest, f"truncated shard: {cut}; last complete member {last}; "
                                             "the samples from there on are lost")
    return records


# ----------------------------------------------------------------------------- images

# What PIL raises for a file it cannot decode: UnidentifiedImageError and truncated data (OSError),
# broken headers (SyntaxError, ValueError), an image over its decompression-bomb limit
# (DecompressionBombError, a plain Exception).
_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
_DECODE_CHUNK = 256  # images decoded per round of threads: bounds what is held before it is checked


def _decode(record: Record):
    if record.offset >= 0:
        with open(record.image, "rb") as f:
            f.seek(record.offset)
            data = f.read(record.size)
        try:
            img = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            # PIL names an in-memory file by its repr (<_io.BytesIO object at 0x...>): name the member
            raise UnidentifiedImageError(f"cannot identify image file {record.member!r}") from None
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
        raise DataError(f"{record.where()}: {record.ref}{of}: {_reason(e)}{SKIP_HINT}") from None


def _decode_each(records: list[Record], threads: int, convert=None):
    """(record, convert(image) or None, failure reason or None) for every record, in order; decoded by
    `threads` threads (PIL releases the GIL while decoding and resizing), a chunk at a time."""
    def one(r):
        try:
            img = _decode(r)
            return (convert(img) if convert is not None else None), None
        except _IMAGE_ERRORS as e:
            return None, _reason(e)
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for start in range(0, len(records), _DECODE_CHUNK):
            chunk = records[start:start + _DECODE_CHUNK]
            for r, (x, err) in zip(chunk, pool.map(one, chunk)):
                yield r, x, err


def verify_records(records: list[Record], *, source: str, bad: Bad, threads: int = 2) -> list[Record]:
    """Decode every image once; drop (or raise on) the ones that cannot be decoded."""
    out = []
    for r, _, err in _decode_each(records, threads):
        if err is None:
            out.append(r)
        else:
            bad(source, r.where(), r.ref, err)
    return out


def _pixel_split(transform):
    """(its PIL steps, its Normalize steps) when `transform` is a torchvision Compose of PIL steps, a
    ToTensor and Normalize steps, as open_clip's evaluation transform is; else None."""
    if not isinstance(transform, Compose):
        return None
    steps = transform.transforms
    at = next((i for i, t in enumerate(steps) if isinstance(t, ToTensor)), None)
    if at is None or not all(isinstance(t, Normalize) for t in steps[at + 1:]):
        return None
    return Compose(steps[:at]), Compose(steps[at + 1:])


def load_probe_images(records: list[Record], transform, *, source: str, bad: Bad, threads: int = 2,
                      budget_bytes: int = 0) -> "ImageDataset":
    """Decode every probe image once, now, so that a bad one stops the run (or is skipped) before any
    training. When the transform splits into PIL steps and Normalize (open_clip's evaluation transform
    does) and the decoded images fit in `budget_bytes`, they are kept as uint8 after the resize and
    crop (3·H·W bytes each: 150,528 at 224 px, 903 MB for 6,000 images), so that each checkpoint only
    runs the model; otherwise they are decoded again at each checkpoint."""
    split = _pixel_split(transform) if budget_bytes > 0 else None

    def convert(img):  # reads `split` at each call: None once the images are not to be kept
        return pil_to_tensor(split[0](img)) if split is not None else None

    pixels, good = None, []
    for r, x, err in _decode_each(records, threads, convert):
        if err is not None:
            bad(source, r.where(), r.ref, err)
            continue
        if x is not None and pixels is None and split is not None:  # the first image sizes the cache
            if len(records) * x.numel() <= budget_bytes:
                pixels = torch.empty((len(records), *x.shape), dtype=torch.uint8)
            else:
                split = None
        if pixels is not None:
            if x is None or x.shape != pixels.shape[1:]:  # the transform does not give one size
                pixels = split = None
            else:
                pixels[len(good)] = x  # rows of good images only, in order
        good.append(r)
    return ImageDataset(good, transform, source=source, pixels=None if pixels is None else pixels[:len(good)])


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
    """Probe images: item i -> image tensor, decoded at each access (in DataLoader workers), or, with
    `pixels` (uint8 [N, 3, H, W]: the images after the transform's PIL steps, see
    `load_probe_images`), the transform's ToTensor scaling and Normalize applied to row i."""

    def __init__(self, records: list[Record], transform, *, source: str, pixels: torch.Tensor | None = None):
        self.records, self.transform, self.source, self.pixels = records, transform, source, pixels
        self._normalize = _pixel_split(transform)[1] if pixels is not None else None

    @property
    def in_memory(self) -> bool:
        """The images are held decoded: embedding them needs no decoding and no DataLoader workers."""
        return self.pixels is not None

    def __len__(self):
        return len(self.records)

    def head(self, n: int) -> "ImageDataset":
        """The first `n` images (ProbeSet.head)."""
        pixels = self.pixels[:n] if self.pixels is not None else None
        return ImageDataset(self.records[:n], self.transform, source=self.source, pixels=pixels)

    def __getitem__(self, i):
        if self.pixels is not None:
            return self._normalize(self.pixels[i].float().div(255))  # = ToTensor of the PIL steps' output
        return self.transform(open_image(self.records[i], self.source))

    def batches(self, batch_size: int, device, num_workers: int = 0):
        """Every image in order, `batch_size` at a time, on `device`: slices of the held pixels
        converted there (a quarter of the bytes to move; the same operations as ToTensor and
        Normalize, in place), or images decoded by `num_workers` DataLoader workers."""
        if self.pixels is None:
            for x in DataLoader(self, batch_size=batch_size, shuffle=False, num_workers=num_workers):
                yield x.to(device)
            return
        for i in range(0, len(self), batch_size):
            x = self.pixels[i:i + batch_size].to(device).float().div_(255)
            for t in self._normalize.transforms:
                x.sub_(torch.as_tensor(t.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1))
                x.div_(torch.as_tensor(t.std, dtype=x.dtype, device=x.device).view(-1, 1, 1))
            yield x


def probe_parts(records: list[Record]) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """(every caption, caption_image [M], image ids [N]) of probe records."""
    captions, owner = [], []
    for i, r in enumerate(records):
        captions.extend(r.captions)
        owner.extend([i] * len(r.captions))
    return captions, torch.tensor(owner, dtype=torch.int64), torch.tensor([r.uid for r in records], dtype=torch.int64)
