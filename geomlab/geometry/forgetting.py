"""Accuracy matrix, forgetting and backward transfer (docs/definitions.md, "Accuracy matrix",
"Forgetting and BWT")."""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from .retrieval import retrieval_metrics

R1 = ("image_to_text_R@1", "text_to_image_R@1")


def _r1(cell) -> float:
    if isinstance(cell, Mapping) and R1[0] in cell:
        metrics = cell
    else:
        metrics = retrieval_metrics(cell.image.float(), cell.text.float(), getattr(cell, "caption_image", None))
    return 0.5 * (metrics[R1[0]] + metrics[R1[1]])


def accuracy_matrix(rows: Sequence, domains: Sequence[str] | None = None) -> torch.Tensor:
    """A[t][d] = ½ (image→text R@1 + text→image R@1) on domain d after phase t.

    `rows[t]` is a `Trace` (its `.domains`) or a mapping domain → `DomainEmbeddings` or
    domain → retrieval metrics (`retrieval_metrics` output). `domains` defaults to the first row's,
    in order. Returns a float64 tensor [len(rows), len(domains)].
    """
    rows = [getattr(r, "domains", r) for r in rows]
    if not rows:
        return torch.zeros(0, len(domains or []), dtype=torch.float64)
    domains = list(domains if domains is not None else rows[0])
    return torch.tensor([[_r1(r[d]) for d in domains] for r in rows], dtype=torch.float64)


def forgetting(A) -> torch.Tensor:
    """Forgetting of each domain d: max_{t<T} A[t][d] − A[T][d] (T = last row). NaN when A has one row."""
    A = torch.as_tensor(A, dtype=torch.float64)
    if A.shape[0] < 2:
        return torch.full((A.shape[1],), float("nan"), dtype=torch.float64)
    return A[:-1].max(dim=0).values - A[-1]


def bwt(A) -> float:
    """Backward transfer: mean over d < T of A[T][d] − A[d][d] (T = last row; d < number of domains).
    NaN when there is no such d."""
    A = torch.as_tensor(A, dtype=torch.float64)
    T = A.shape[0] - 1
    ds = range(min(T, A.shape[1]))
    if T < 1 or not len(ds):
        return float("nan")
    return float(torch.stack([A[T, d] - A[d, d] for d in ds]).mean())


def average_accuracy(A) -> float:
    """Mean of the last row of A."""
    A = torch.as_tensor(A, dtype=torch.float64)
    return float(A[-1].mean()) if A.numel() else float("nan")
