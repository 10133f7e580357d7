"""The check every geometry measure makes where its data enters: NaN, ±inf or a zero row (no
direction) never turns into a number (docs/definitions.md, "Non-finite and degenerate input")."""
from __future__ import annotations

import torch


def check_rows(what: str, *, nonzero: bool = False, **inputs) -> None:
    """Raise ValueError("{what}: {n} of {N} rows of {name} are not finite (NaN or inf)") for the first
    of `inputs` (name=tensor; None skipped) holding NaN or ±inf; with `nonzero`, also for one with
    all-zero rows, which have no direction. A 1-D input counts entries instead of rows.

    A clean input costs one sum (and, with `nonzero`, one comparison) per input."""
    for name, x in inputs.items():
        if x is None:
            continue
        x = torch.as_tensor(x)
        if x.numel() == 0:
            continue
        if x.dim() == 0:
            x = x.reshape(1)
        unit = "rows" if x.dim() > 1 else "entries"
        # a finite sum proves every entry finite (one fast reduction); only an overflowing sum of
        # finite values, or a non-finite entry, takes the row count
        if (x.is_floating_point() or x.is_complex()) and not bool(torch.isfinite(x.sum())):
            bad = int((~torch.isfinite(x).reshape(x.shape[0], -1).all(1)).sum())
            if bad:
                raise ValueError(f"{what}: {bad} of {x.shape[0]} {unit} of {name} are not finite (NaN or inf)")
        if nonzero and x.dim() > 1 and x.shape[0]:
            zero = ~(x != 0).reshape(x.shape[0], -1).any(1)
            if bool(zero.any()):
                raise ValueError(f"{what}: {int(zero.sum())} of {x.shape[0]} rows of {name} are zero "
                                 "(a zero row has no direction)")
