"""The accuracy matrix and the continual-learning metrics read off it: Last, Avg, BWT, forgetting and
Transfer (docs/definitions.md, "Accuracy matrix" and "Forgetting and BWT").

Rows of A are phases 0..T (row t: after phase t); columns are probe sets. Which phase each probe set
is learned at comes from the stream (`ProbeSet.phases`, run.json's `probe_phases`), never from the
column order: `learned` holds t_p per column, None for a probe set whose data no phase trains on.
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Mapping, Sequence

import torch

from .retrieval import retrieval_metrics

R1 = ("image_to_text_R@1", "text_to_image_R@1")
#: R@1 is a count of hits over a count of queries. A cell of A and every metric read off A are
#: computed on exact fractions and rounded to float64 once, at the end: each float is read back as
#: the nearest fraction whose denominator is at most GRID, which is k/n itself for any n ≤ GRID
#: (the float is within 2⁻⁵³ of k/n, any other such fraction at least 2⁻⁵⁰ away). So the same
#: counts, or the same difference of counts, give the same float in every seed and every order.
GRID = 1 << 25


def exact(v) -> Fraction | None:
    """The value on R@1's exact grid (see GRID): a Fraction, or None for NaN/inf/None."""
    if v is None:
        return None
    v = float(v)
    return Fraction(v).limit_denominator(GRID) if math.isfinite(v) else None


def exact_mean(values) -> float:
    """The mean of `values` computed exactly on R@1's grid (`exact`), rounded once to float64;
    NaN when there is none or one of them is NaN (as a float mean would be)."""
    fr = [exact(v) if not isinstance(v, Fraction) else v for v in values]
    return _mean(fr)


def _mean(values: list) -> float:
    if not values or any(v is None for v in values):
        return float("nan")
    return float(sum(values, Fraction(0)) / len(values))


def _r1(cell) -> float:
    if isinstance(cell, Mapping) and R1[0] in cell:
        metrics = cell
    else:
        metrics = retrieval_metrics(cell.image.float(), cell.text.float(), getattr(cell, "caption_image", None))
    return exact_mean([metrics[R1[0]], metrics[R1[1]]])


def accuracy_matrix(rows: Sequence, domains: Sequence[str] | None = None) -> torch.Tensor:
    """A[t][p] = ½ (image→text R@1 + text→image R@1) on probe set p after phase t.

    `rows[t]` is a `Trace` (its `.domains`) or a mapping probe → `DomainEmbeddings` or
    probe → retrieval metrics (`retrieval_metrics` output). `domains` defaults to the first row's,
    in order. Returns a float64 tensor [len(rows), len(domains)], each cell the exact half-sum
    rounded once (GRID).
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


def _cells(A: torch.Tensor) -> list[list]:
    """A's cells on the exact grid (None for NaN)."""
    return [[exact(v) for v in row] for row in A.tolist()]


def _check(A: torch.Tensor, learned: Sequence[int | None]) -> None:
    if len(learned) != A.shape[1]:
        raise ValueError(f"learned has {len(learned)} entries for {A.shape[1]} probe sets")


def _forgetting(F: list[list], learned: Sequence[int | None]) -> list:
    """Per probe set: the exact forgetting (Fraction), None where NaN, False where undefined."""
    T = len(F) - 1
    out = []
    for p, tp in enumerate(learned):
        if tp is None or tp >= T:
            out.append(False)
            continue
        col = [F[t][p] for t in range(tp, T + 1)]
        out.append(None if any(v is None for v in col) else max(col[:-1]) - col[-1])
    return out


def forgetting(A, learned: Sequence[int | None]) -> torch.Tensor:
    """Forgetting of each probe set p: max_{t_p ≤ t < T} A[t][p] − A[T][p] (T = last row), exact (GRID).
    NaN where undefined: p never trained on (t_p None) or learned at T or later."""
    A = _matrix(A)
    _check(A, learned)
    f = _forgetting(_cells(A), learned)
    return torch.tensor([float("nan") if v is None or v is False else float(v) for v in f], dtype=torch.float64)


def bwt(A, learned: Sequence[int | None]) -> float:
    """Backward transfer (GEM): mean over probe sets with t_p < T of A[T][p] − A[t_p][p]; NaN when none."""
    A = _matrix(A)
    _check(A, learned)
    F, T = _cells(A), A.shape[0] - 1
    return _mean([None if F[T][p] is None or F[tp][p] is None else F[T][p] - F[tp][p]
                  for p, tp in enumerate(learned) if tp is not None and tp < T])


def last_accuracy(A) -> float:
    """Last: the mean of the final row (every probe set, learned or not). NaN for an empty matrix."""
    A = _matrix(A)
    return _mean(_cells(A)[-1]) if A.numel() else float("nan")


def average_accuracy(A, learned: Sequence[int | None]) -> float:
    """Avg: the mean over phases t of the mean of A[t][p] over the probe sets learned at or before t
    (t_p ≤ t); phases where no probe set is learned yet are left out. NaN when none is ever learned."""
    A = _matrix(A)
    _check(A, learned)
    F = _cells(A)
    per_phase = []
    for t in range(A.shape[0]):
        seen = [F[t][p] for p, tp in enumerate(learned) if tp is not None and tp <= t]
        if seen:
            per_phase.append(None if any(v is None for v in seen) else sum(seen, Fraction(0)) / len(seen))
    return _mean(per_phase)


def transfer(A, learned: Sequence[int | None]) -> float:
    """Transfer: the mean of A[t][p] over every (t, p) with p not yet trained on at t (t < t_p; every t
    for a probe set no phase trains on). NaN when there is no such cell."""
    A = _matrix(A)
    _check(A, learned)
    F = _cells(A)
    return _mean([F[t][p] for p, tp in enumerate(learned) for t in range(A.shape[0]) if tp is None or t < tp])


def continual_metrics(A, learned: Sequence[int | None] | None) -> dict:
    """Every metric of A: {"last", "avg", "bwt", "transfer", "forgetting" (per probe set),
    "mean_forgetting"}. Without a mapping (`learned` None) only "last" exists; the others are NaN.
    All exact on R@1's grid (GRID), rounded once."""
    A = _matrix(A)
    nan = float("nan")
    if learned is None:
        return {"last": last_accuracy(A), "avg": nan, "bwt": nan, "transfer": nan,
                "forgetting": [nan] * A.shape[1], "mean_forgetting": nan}
    _check(A, learned)
    f = _forgetting(_cells(A), learned)
    defined = [v for v in f if v is not None and v is not False]
    return {"last": last_accuracy(A), "avg": average_accuracy(A, learned), "bwt": bwt(A, learned),
            "transfer": transfer(A, learned), "forgetting": forgetting(A, learned).tolist(),
            "mean_forgetting": _mean(defined)}
