"""Zero-shot classification (docs/definitions.md, "Zero-shot classification"): how often a checkpoint
names an image's class from text prompts alone, and ImageFolder directories as zero-shot data.

A class's embedding is the normalised mean of its prompts' normalised text embeddings (CLIP's prompt
ensembling; with one template, that prompt's embedding). Each image gets the class of highest cosine
similarity, a tie going to the smallest class index (torch's argmax); the score is top-1 accuracy.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from geomlab.data import DataError, ZeroShotSet
from geomlab.data.readers import Bad, ImageDataset, Record, verify_records

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def class_embeddings(model, tokenizer, classes, templates, device) -> torch.Tensor:
    """[C, d] float32 on the CPU: per class, the normalised mean of its normalised prompt embeddings."""
    prompts = [t.format(c) for c in classes for t in templates]
    text = F.normalize(model.encode_text(tokenizer(prompts).to(device)).float(), dim=-1).cpu()
    return F.normalize(text.view(len(classes), len(templates), -1).mean(dim=1), dim=-1)


def top1_accuracy(image_features: torch.Tensor, classes: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of images whose most similar class embedding is their own class."""
    scores = F.normalize(image_features.float(), dim=-1) @ classes.float().T
    return float((scores.argmax(dim=1) == labels).double().mean())


@torch.no_grad()
def embed_images(model, images, device, batch_size: int = 256) -> torch.Tensor:
    """[N, d] float32 normalised image embeddings of a Dataset of image tensors, in order."""
    out = [F.normalize(model.encode_image(batch.to(device)).float(), dim=-1).cpu()
           for batch in DataLoader(images, batch_size=batch_size, shuffle=False)]
    return torch.cat(out)


def evaluate(model, tokenizer, sets: list[ZeroShotSet], device, probe_images: dict[str, torch.Tensor],
             batch_size: int = 256) -> dict[str, float]:
    """{set name: top-1 accuracy} of the model in eval mode. `probe_images`: probe name -> the image
    embeddings already computed for that probe set (sets with `probe` reuse them). Leaves torch's
    random state as it found it, so training after an evaluation is unchanged."""
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]):  # a DataLoader draws its base seed from torch's RNG
            out = {}
            for zs in sets:
                images = probe_images[zs.probe] if zs.probe is not None else embed_images(
                    model, zs.images, device, batch_size)
                out[zs.name] = top1_accuracy(images, class_embeddings(model, tokenizer, zs.classes, zs.templates,
                                                                      device), zs.labels)
    finally:
        model.train(was_training)
    return out


# ----------------------------------------------------------------------------- ImageFolder data


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
