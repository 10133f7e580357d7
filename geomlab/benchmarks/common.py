"""Shared output for the benchmark suites: one aligned table on stdout, optionally JSON."""
from __future__ import annotations

import platform

import torch

from geomlab.io import atomic_write_json


def machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "cpu_threads": torch.get_num_threads(), "machine": platform.machine()}
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name()
    return info


def print_table(rows: list[dict], columns: list[str] | None = None) -> None:
    if not rows:
        print("(no rows)")
        return
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def write_json(path: str | None, suite: str, rows: list[dict], **extra) -> None:
    if path:
        atomic_write_json(path, {"suite": suite, "machine": machine(), "rows": rows, **extra})


# ---------------------------------------------------------------------------------------------
# probe data for the ranking kernels (topk, retrieval_ranks): the data axis of both benchmarks
# ---------------------------------------------------------------------------------------------

#: the kinds of (image, caption) data the ranking kernels are timed on, by the median rank of a
#: positive they aim at: a number of gallery items, a fraction of the gallery (a float < 1), or
#: None for unrelated features. Exact ranks cost most where positives sit among many others
#: (the probe sets of forgotten domains), least where they rank first (the kernels' own data).
DATA_KINDS = {"rank0": 0, "rank30": 30, "rank1%": 0.01, "unrelated": None}
#: expected number of gallery items above a positive of median score, for the kind aiming at 0
RANK0_TAIL = 0.05
#: queries whose exact ranks estimate the median rank recorded with each benchmark row
MEDIAN_SAMPLE = 2048


def caption_noise(median_rank: float, n: int, d: int) -> float:
    """σ such that captions normalise(image + σ·u), u a random unit vector and images random unit
    features, put a positive at about `median_rank` among n gallery items (a fraction of n when
    < 1). A positive scores ≈ 1/√(1+σ²) at its median, any other pair ≈ N(0, 1/d); so the median
    rank ≈ n·Q(√d/√(1+σ²)) (Q the normal tail), solved for σ."""
    import math
    from statistics import NormalDist

    expected = median_rank * n if 0 < median_rank < 1 else max(median_rank, RANK0_TAIL)
    z = -NormalDist().inv_cdf(min(0.5, expected / n))
    return math.sqrt(max(d / z**2 - 1.0, 0.0)) if z > 0 else float("inf")


def probe_pair(kind: str, n: int, d: int, seed: int = 0, device="cpu", dtype=torch.float32):
    """(image [n, d], caption [n, d]) unit features of a DATA_KINDS kind (caption i belongs to image
    i), drawn from `seed` on `device` (so a CUDA pair differs from the CPU one of the same seed)."""
    import torch.nn.functional as F

    g = torch.Generator(device=device).manual_seed(seed)  # drawn where they are used: no N×d copy
    image = F.normalize(torch.randn(n, d, generator=g, device=device), dim=1)
    other = F.normalize(torch.randn(n, d, generator=g, device=device), dim=1)
    target = DATA_KINDS[kind]
    caption = other if target is None else F.normalize(image + caption_noise(target, n, d) * other, dim=1)
    return image.to(dtype), caption.to(dtype)


def median_rank(image: torch.Tensor, caption: torch.Tensor, sample: int = MEDIAN_SAMPLE) -> float:
    """The median image→caption rank (0-based, ties as retrieval_ranks) over `sample` evenly spread
    images, each ranked exactly against every caption from fp32 scores."""
    n = image.shape[0]
    rows = torch.linspace(0, n - 1, min(n, sample), device=image.device).long().unique()
    s = image[rows].float() @ caption.float().T
    pos = s.gather(1, rows[:, None])
    cols = torch.arange(caption.shape[0], device=image.device)[None, :]
    ranks = ((s > pos) | ((s == pos) & (cols < rows[:, None]))).sum(1)
    return float(ranks.float().median())
