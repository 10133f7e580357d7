"""ImageFolder directories (torchvision's layout: one sub-folder per class) as zero-shot data: a
source with role = "zeroshot", format = "imagefolder" (docs/definitions.md, "Zero-shot
classification"). Evaluated by geomlab.zeroshot; read here, with the other data sources, so that
geomlab.data never imports geomlab.zeroshot (which imports geomlab.data).
"""
from __future__ import annotations

from pathlib import Path

import torch

from . import DataError, ZeroShotSet
from .readers import Bad, ImageDataset, Record, verify_records

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def check_templates(templates, where: str) -> list[str]:
    if not templates:
        raise DataError(f"{where}.templates: give at least one prompt template")
    for t in templates:
        if t.count("{}") != 1 or t.replace("{}", "").count("{") or t.replace("{}", "").count("}"):
            raise DataError(f"{where}.templates: {t!r} must hold the class name's place \"{{}}\" exactly once "
                            "and no other braces")
    return list(templates)


def read_imagefolder(path: Path, *, source: str, limit: int = 0) -> tuple[list[Record], list[str]]:
    """An ImageFolder directory (torchvision's layout: one sub-folder per class holding its images):
    (records in class order, then file-name order; the class folder names, sorted). `limit` > 0
    keeps the first `limit` images of each class."""
    where = f"data.sources[{source!r}]"
    if not path.is_dir():
        raise DataError(f"{path}: {where}: the ImageFolder directory does not exist")
    folders = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(folders) < 2:
        raise DataError(f"{path}: {where}: an ImageFolder needs at least two class sub-folders, found {len(folders)}")
    records = []
    for folder in folders:
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"{folder}: {where}: class folder holds no image ({', '.join(IMAGE_SUFFIXES)})")
        records += [Record(image=str(p), captions=[], ref=f"{folder.name}/{p.name}")
                    for p in (files[:limit] if limit > 0 else files)]
    return records, [f.name for f in folders]


def imagefolder_set(src: dict, path: Path, transform, bad: Bad, verify: bool) -> tuple[ZeroShotSet, list[Record]]:
    """The zero-shot set of a source with role = "zeroshot", format = "imagefolder" (and its records).
    Class names in prompts are the folder names with "_" read as a space."""
    name = src["name"]
    templates = check_templates(src["templates"], f"data.sources[{name!r}]")
    records, folders = read_imagefolder(path, source=name, limit=src["limit"])
    if verify:
        records = verify_records(records, source=name, bad=bad)
    index = {f: i for i, f in enumerate(folders)}
    labels = torch.tensor([index[Path(r.image).parent.name] for r in records], dtype=torch.int64)
    zs = ZeroShotSet(name=name, classes=[f.replace("_", " ") for f in folders], templates=templates, labels=labels,
                     images=ImageDataset(records, transform, source=name))
    return zs, records
