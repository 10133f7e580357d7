"""The accuracy matrix and the continual-learning metrics read off it: Last, Avg, BWT, forgetting and
Transfer (docs/definitions.md, "Accuracy matrix" and "Forgetting and BWT").

Rows of A are phases 0..T (row t: after phase t); columns are probe sets. Which phase each probe set
is learned at comes from the stream (`ProbeSet.phases`, run.json's `probe_phases`), never from the
column order: `learned` holds t_p per column, None for a probe set whose data no phase trains on.
"""
from __future__ import annotations

import math
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
    """A[t][p] = ½ (image→text R@1 + text→image R@1) on probe set p after phase t.

    `rows[t]` is a `Trace` (its `.domains`) or a mapping probe → `DomainEmbeddings` or
    probe → retrieval metrics (`retrieval_metrics` output). `domains` defaults to the first row's,
    in order. Returns a float64 tensor [len(rows), len(domains)].
    """
    rows = [getattr(r, "domains", r) for r in rows]
    if not rows:
        return torch.zeros(0, len(domains or []), dtype=torch.float64)
    domains = list(domains if domains is not None else rows[0])
    return torch.tensor([[_r1(r[d]) for d in domains] for r in rows], dtype=torch.float64)


def learned_at(phases: Sequence[int]) -> int | None:
    """t_p: the last phase that trains on a probe set's data (`ProbeSet.phases`); None when none does."""
    return max(phases) if len(phases) else None


def _matrix(A) -> torch.Tensor:
    return torch.as_tensor(A, dtype=torch.float64)


def _check(A: torch.Tensor, learned: Sequence[int | None]) -> None:
    if len(learned) != A.shape[1]:
        raise ValueError(f"learned has {len(learned)} entries for {A.shape[1]} probe sets")


def _mean(values: list) -> float:
    return float(torch.stack(values).mean()) if values else float("nan")


def forgetting(A, learned: Sequence[int | None]) -> torch.Tensor:
    """Forgetting of each probe set p: max_{t_p ≤ t < T} A[t][p] − A[T][p] (T = last row).
    NaN where undefined: p never trained on (t_p None) or learned at T or later."""
    A = _matrix(A)
    _check(A, learned)
    T = A.shape[0] - 1
    out = torch.full((A.shape[1],), float("nan"), dtype=torch.float64)
    for p, tp in enumerate(learned):
        if tp is not None and tp < T:
            out[p] = A[tp:T, p].max() - A[T, p]
    return out


def bwt(A, learned: Sequence[int | None]) -> float:
    """Backward transfer (GEM): mean over probe sets with t_p < T of A[T][p] − A[t_p][p]; NaN when none."""
    A = _matrix(A)
    _check(A, learned)
    T = A.shape[0] - 1
    return _mean([A[T, p] - A[tp, p] for p, tp in enumerate(learned) if tp is not None and tp < T])


def last_accuracy(A) -> float:
    """Last: the mean of the final row (every probe set, learned or not). NaN for an empty matrix."""
    A = _matrix(A)
    return float(A[-1].mean()) if A.numel() else float("nan")


def average_accuracy(A, learned: Sequence[int | None]) -> float:
    """Avg: the mean over phases t of the mean of A[t][p] over the probe sets learned at or before t
    (t_p ≤ t); phases where no probe set is learned yet are left out. NaN when none is ever learned."""
    A = _matrix(A)
    _check(A, learned)
    per_phase = []
    for t in range(A.shape[0]):
        seen = [p for p, tp in enumerate(learned) if tp is not None and tp <= t]
        if seen:
            per_phase.append(A[t, seen].mean())
    return _mean(per_phase)


def transfer(A, learned: Sequence[int | None]) -> float:
    """Transfer: the mean of A[t][p] over every (t, p) with p not yet trained on at t (t < t_p; every t
    for a probe set no phase trains on). NaN when there is no such cell."""
    A = _matrix(A)
    _check(A, learned)
    return _mean([A[t, p] for p, tp in enumerate(learned) for t in range(A.shape[0]) if tp is None or t < tp])


def continual_metrics(A, learned: Sequence[int | None] | None) -> dict:
    """Every metric of A: {"last", "avg", "bwt", "transfer", "forgetting" (per probe set),
    "mean_forgetting"}. Without a mapping (`learned` None) only "last" exists; the others are NaN."""
    A = _matrix(A)
    nan = float("nan")
    if learned is None:
        return {"last": last_accuracy(A), "avg": nan, "bwt": nan, "transfer": nan,
                "forgetting": [nan] * A.shape[1], "mean_forgetting": nan}
    f = forgetting(A, learned)
    defined = [v for v in f.tolist() if not math.isnan(v)]
    return {"last": last_accuracy(A), "avg": average_accuracy(A, learned), "bwt": bwt(A, learned),
            "transfer": transfer(A, learned), "forgetting": f.tolist(),
            "mean_forgetting": sum(defined) / len(defined) if defined else nan}
