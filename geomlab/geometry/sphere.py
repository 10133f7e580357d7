"""The 3-D view of probe embeddings: a 3-component PCA fitted at one checkpoint, and every
checkpoint's sampled probe pairs projected with it and scaled to unit length (on the sphere)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.decomposition import PCA

SPHERE_SAMPLES = 100  # probe pairs per domain shown in the 3-D view


@dataclass
class SphereProjection:
    pca: PCA
    picks: dict[str, tuple[torch.Tensor, torch.Tensor]]  # domain -> (image rows, first caption row of each)

    @classmethod
    def fit(cls, trace, samples: int = SPHERE_SAMPLES) -> "SphereProjection":
        """PCA (sklearn, 3 components) of `trace`'s image and text embeddings of every domain, and
        `samples` evenly spaced probe pairs per domain."""
        rows, picks = [], {}
        for d, e in trace.domains.items():
            n = e.image.shape[0]
            idx = torch.linspace(0, n - 1, min(n, samples)).round().long().unique()
            ci = e.caption_image if e.caption_image is not None else torch.arange(e.text.shape[0])
            first_caption = torch.full((n,), -1, dtype=torch.long)
            order = torch.arange(ci.numel() - 1, -1, -1)
            first_caption[ci[order]] = order  # written last to first: the first caption of each image wins
            picks[d] = (idx, first_caption[idx])
            rows += [e.image.float(), e.text.float()]
        x = torch.cat(rows).numpy()
        return cls(PCA(n_components=min(3, x.shape[1], x.shape[0])).fit(x), picks)

    @property
    def explained_variance(self) -> list[float]:
        return [float(v) for v in self.pca.explained_variance_ratio_]

    def points(self, trace) -> dict:
        """{domain: {"image": [[x, y, z], ...], "text": [...]}}: the sampled pairs of `trace`, on the sphere."""
        out = {}
        for d, (idx, cap) in self.picks.items():
            e = trace.domains[d]
            pts = {}
            for mod, x in (("image", e.image[idx]), ("text", e.text[cap.clamp(min=0)])):
                p = (x.double().numpy() - self.pca.mean_) @ self.pca.components_.T
                if p.shape[1] < 3:
                    p = np.pad(p, ((0, 0), (0, 3 - p.shape[1])))
                p = p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12)
                pts[mod] = np.round(p, 4).tolist()
            out[d] = pts
        return out

    def samples(self, trace, captions: dict) -> dict:
        """{domain: {"ids": [...], "captions": [...] or None}} of the sampled pairs; captions from
        `captions` (domain -> ProbeSet) when that probe set has exactly `trace`'s image ids."""
        out = {}
        for d, (idx, cap) in self.picks.items():
            e = trace.domains[d]
            probe = captions.get(d)
            texts = None
            if probe is not None and len(probe.ids) == len(e.ids) and torch.equal(probe.ids, e.ids):
                texts = [str(probe.captions[int(c)]) if c >= 0 else "" for c in cap.tolist()]
            out[d] = {"ids": e.ids[idx].tolist(), "captions": texts}
        return out
