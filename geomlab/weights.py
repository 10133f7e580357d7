"""How far a checkpoint's weights moved from the base model (docs/definitions.md, "Weight distance"):
‖θ − θ_base‖ / ‖θ_base‖ over every floating-point tensor of the state dict, flattened together.

The analyser reads it off the checkpoint files themselves (`torch.load(..., weights_only=True)` via
`geomlab.io.load_checkpoint`), the base once per run, each checkpoint once, and caches the result
under OUT/cache/weight_distance.json while both files stay the same (path, size, mtime). Reading the
files works for every run, old or new, and for a plain directory of open_clip checkpoints, at the cost
of one read per checkpoint on the first analysis; series with traces only (no .pt) have none.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping

import torch

from geomlab.io import atomic_write_json, load_checkpoint

CHUNK = 1 << 22  # elements per float64 chunk: bounds the extra memory of a large tensor
CACHE = "weight_distance.json"


def _float_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}


def weight_distance(state: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]) -> float | None:
    """‖θ − θ_base‖ / ‖θ_base‖: θ, θ_base = every floating-point tensor of the two state dicts
    (parameters and float buffers, e.g. the logit scale; integer buffers left out), flattened and concatenated in
    the same key order; differences in the tensors' precision, sums of squares accumulated in float64. None when ‖θ_base‖ = 0 or a value is
    not finite. The two must hold the same floating-point keys with the same shapes (ValueError)."""
    a, b = _float_tensors(state), _float_tensors(base)
    if a.keys() != b.keys():
        diff = sorted(set(a) ^ set(b))
        raise ValueError(f"weight_distance: the state dicts differ in floating-point tensors {', '.join(diff[:5])}")
    # The difference in the tensors' own precision, its squares summed in float64 (vector_norm's
    # dtype): a float32 difference is off by at most 2⁻²⁴ of itself, so the distance is too, and
    # two float64 copies per tensor made the analysis of a study's checkpoints 5× slower. The sums
    # stay float64 tensors until the end: one conversion per call.
    num = torch.zeros((), dtype=torch.float64)
    den = torch.zeros((), dtype=torch.float64)
    for k, tb in b.items():
        ta = a[k]
        if ta.shape != tb.shape:
            raise ValueError(f"weight_distance: {k} has shape {tuple(ta.shape)} against {tuple(tb.shape)}")
        fa, fb = ta.detach().reshape(-1), tb.detach().reshape(-1)
        for i in range(0, fb.numel(), CHUNK):
            y = fb[i:i + CHUNK]
            num += torch.linalg.vector_norm(torch.sub(fa[i:i + CHUNK], y), dtype=torch.float64).square()
            den += torch.linalg.vector_norm(y, dtype=torch.float64).square()
    num, den = float(num), float(den)
    if not (math.isfinite(num) and math.isfinite(den)) or den == 0:
        return None
    return math.sqrt(num) / math.sqrt(den)


def _state(path: Path) -> dict:
    from geomlab.models import state_dict_of  # open_clip's import: only when a checkpoint is read
    return state_dict_of(load_checkpoint(path))


def _fingerprint(path: Path) -> list:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


class WeightDistances:
    """Distances of checkpoints from their series' first (base) checkpoint, cached in `cache_dir`."""

    def __init__(self, cache_dir):
        self.path = Path(cache_dir) / CACHE
        try:
            self.cache = json.loads(self.path.read_text()) if self.path.is_file() else {}
        except (OSError, ValueError):
            self.cache = {}
        self.changed = False
        self._base: tuple[Path, dict] | None = None

    def _base_state(self, path: Path) -> dict:
        if self._base is None or self._base[0] != path:
            self._base = (path, _state(path))
        return self._base[1]

    def series(self, cks: list) -> list[float | None]:
        """Per checkpoint of one series (`geomlab.rundir.Checkpoint`s, the first being the base): its
        distance from the first; None where either has no .pt file."""
        base = cks[0].checkpoint
        out = []
        for c in cks:
            if base is None or c.checkpoint is None:
                out.append(None)
                continue
            if c.checkpoint == base:
                out.append(0.0)
                continue
            key = f"{base.resolve()}|{c.checkpoint.resolve()}"
            fp = [_fingerprint(base), _fingerprint(c.checkpoint)]
            hit = self.cache.get(key)
            if hit is not None and hit.get("fingerprint") == fp:
                out.append(hit["distance"])
                continue
            try:
                d = weight_distance(_state(c.checkpoint), self._base_state(base))
            except ValueError as e:
                raise ValueError(f"{c.checkpoint}: {e}") from None
            self.cache[key] = {"fingerprint": fp, "distance": d}
            self.changed = True
            out.append(d)
        return out

    def save(self) -> None:
        if self.changed:
            atomic_write_json(self.path, self.cache)
            self.changed = False
