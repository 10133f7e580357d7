"""The options of the Mod-X loss and their defaults: no torch here, so that a config can be checked
(geomlab.config) before torch loads."""
from __future__ import annotations

from dataclasses import dataclass

#: Mod-X's α: the weight of the KL term in modx_loss.
MODX_ALPHA = 20.0
#: How the masked per-row KLs of one direction are reduced: their sum, their mean over all B rows,
#: or their mean over the kept rows.
REDUCTIONS = ("sum", "mean", "kept_mean")
#: Which rows the KL term keeps: those the old model still retrieves correctly (Mod-X), or every
#: row (the distillation of LwF and ZSCL).
SELECTIONS = ("correct", "all")


@dataclass(frozen=True)
class ModxOptions:
    """The options of Mod-X's KL term (and their defaults); validated on construction."""

    temperature: float = 1.0
    reduction: str = "sum"
    off_diagonal_only: bool = False
    selection: str = "correct"

    def __post_init__(self):
        for key, valid in (("reduction", REDUCTIONS), ("selection", SELECTIONS)):
            if getattr(self, key) not in valid:
                names = ", ".join(map(repr, valid[:-1])) + f" or {valid[-1]!r}"
                raise ValueError(f"{key} must be {names}, got {getattr(self, key)!r}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
