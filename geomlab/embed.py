"""Embed probe sets with a model: L2-normalised image and text features."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .data import ProbeSet
from .traces import DomainEmbeddings


@torch.no_grad()
def embed_probe(model, tokenizer, probe: ProbeSet, device, batch_size: int = 256) -> DomainEmbeddings:
    was_training = model.training
    model.eval()
    images = []
    for batch in DataLoader(probe.images, batch_size=batch_size, shuffle=False):
        images.append(F.normalize(model.encode_image(batch.to(device)).float(), dim=-1).cpu())
    texts = []
    captions = list(probe.captions)
    for i in range(0, len(captions), batch_size):
        tokens = tokenizer(captions[i:i + batch_size]).to(device)
        texts.append(F.normalize(model.encode_text(tokens).float(), dim=-1).cpu())
    model.train(was_training)
    return DomainEmbeddings(
        image=torch.cat(images), text=torch.cat(texts), ids=probe.ids.clone(),
        caption_image=None if probe.one_caption_per_image else probe.caption_image.clone())
