"""Zero-shot classification (docs/definitions.md, "Zero-shot classification"): how often a checkpoint
names an image's class from text prompts alone (ImageFolder directories as zero-shot data are read by
geomlab.data.imagefolder).

A class's embedding is the normalised mean of its prompts' normalised text embeddings (CLIP's prompt
ensembling; with one template, that prompt's embedding). Each image gets the class of highest cosine
similarity, a tie going to the smallest class index (torch's argmax); the score is top-1 accuracy.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from geomlab.data import ZeroShotSet
# ImageFolder reading lives in geomlab.data (so that data never imports this module); kept importable here
from geomlab.data.imagefolder import IMAGE_SUFFIXES, check_templates, imagefolder_set, read_imagefolder  # noqa: F401


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
