"""JSON-ready summaries of per-sample values (quantiles and histograms)."""
from __future__ import annotations

import numpy as np
import torch

from .checks import check_rows


def summarize(values, *, hist: bool = False, bins: int = 90, lo: float = 0.0, hi: float = 180.0,
              signed: bool = False) -> dict:
    """mean, std, min, p10, p25, median, p75, p90, max (and with `hist`, a fixed-range histogram) of `values`.

    The histogram has `bins` equal bins over [lo, hi] (over [-hi, hi] when `signed`); values outside
    are clipped into the first/last bin. An empty set gives n = 0, every statistic None and an
    all-zero histogram; NaN or inf values raise ValueError.
    """
    check_rows("summarize", values=values)
    x = values.detach().double().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values, float)
    x = x.ravel()
    if signed:
        lo = -hi
    out = {"n": int(x.size)}
    if x.size == 0:
        out.update({k: None for k in ("mean", "std", "min", "p10", "p25", "median", "p75", "p90", "max")})
        if hist:
            out["hist"] = {"lo": lo, "hi": hi, "counts": [0] * bins}
        return out
    q = np.quantile(x, [0.1, 0.25, 0.5, 0.75, 0.9])
    out.update({"mean": float(x.mean()), "std": float(x.std()), "min": float(x.min()),
                "p10": float(q[0]), "p25": float(q[1]), "median": float(q[2]), "p75": float(q[3]),
                "p90": float(q[4]), "max": float(x.max())})
    if not hist:
        return out
    counts, _ = np.histogram(np.clip(x, lo, hi), bins=bins, range=(lo, hi))
    out["hist"] = {"lo": lo, "hi": hi, "counts": counts.astype(int).tolist()}
    return out


def quantile_from_hist(counts: torch.Tensor, width: float, q: float) -> float:
    """The q-quantile of values binned into `counts` (bin b = [b·width, (b+1)·width)), at bin centre."""
    total = counts.sum()
    if total == 0:
        return float("nan")
    cum = torch.cumsum(counts, 0)
    b = int(torch.searchsorted(cum, torch.tensor(q * float(total), dtype=cum.dtype)).item())
    b = min(b, counts.numel() - 1)
    return (b + 0.5) * width
