"""Retrieval metrics, named as open_clip's get_clip_metrics names them (docs/definitions.md,
"Retrieval ranks and ties")."""
from __future__ import annotations

import torch

from geomlab import kernels

from .checks import check_rows


def metrics_from_ranks(i2t: torch.Tensor, t2i: torch.Tensor, ks=(1, 5, 10)) -> dict[str, float]:
    """open_clip's metrics from 0-based ranks of the positives (see `retrieval_metrics`). A direction
    without queries has none of them: every metric NaN.

    Every metric is a count over the n queries divided by n in float64 (Python's correctly rounded
    int / int): R@K = hits / n, so equal hit counts give equal floats whatever the order of the
    queries (a float32 mean would not: 3/200 could come out as 0.0149999997 or 0.0150000001)."""
    out = {}
    for direction, ranks in (("image_to_text", i2t), ("text_to_image", t2i)):
        ranks = ranks.to(torch.int64)
        n = ranks.numel()
        if n == 0:
            names = ("mean_rank", "median_rank", *(f"R@{k}" for k in ks))
            out.update({f"{direction}_{m}": float("nan") for m in names})
            continue
        out[f"{direction}_mean_rank"] = int(ranks.sum()) / n + 1
        # numpy's median (mean of the two middle values for an even count), as open_clip takes it
        out[f"{direction}_median_rank"] = float(torch.floor(ranks.double().quantile(0.5)).item()) + 1
        for k in ks:
            out[f"{direction}_R@{k}"] = int((ranks < k).sum()) / n
    return out


def retrieval_metrics(image: torch.Tensor, text: torch.Tensor, caption_image: torch.Tensor | None = None,
                      ks=(1, 5, 10), backend: str = "auto") -> dict[str, float]:
    """image→text and text→image R@K, mean rank and median rank.

    rank = 0-based position of the positive (streamed, `geomlab.kernels.retrieval_ranks`);
    R@K = mean(rank < K); mean_rank = mean(rank) + 1; median_rank = floor(median(rank)) + 1,
    as open_clip computes them. With several captions per image an image→text query counts its
    best-ranked caption. NaN or inf rows raise ValueError (with NaN every "score > positive"
    comparison is false and every query would come out right); zero rows score 0 against every
    item, ranked by the tie rule.
    """
    check_rows("retrieval_metrics", image=image, text=text)
    i2t, t2i = kernels.retrieval_ranks(image, text, caption_image, backend=backend)
    return metrics_from_ranks(i2t, t2i, ks)
