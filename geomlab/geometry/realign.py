"""Realignment: how much of a checkpoint's lost retrieval on an old probe set a map fitted on held-out
pairs brings back (docs/definitions.md, "Realignment and recovered share").

Three maps, each fitted on a calibration split (pairs of the old domain disjoint from the probes)
and scored on the probe pairs:
- cross-modal orthogonal: the rotation Q that best maps the checkpoint's text onto its images;
- per-modality orthogonal: each modality's own rotation back to the base model's embeddings;
- cross-modal linear: a ridge map text → image, the bound of what any linear map restores.
The recovered share compares the realigned R@1 with the base model's under the same realignment.

Every embedding is taken to unit length in float64 before a fit (float16 traces can be passed as
they are); every R@1 is the accuracy matrix's cell (½ (image→text + text→image) R@1, exact on R@1's
grid), so the unrealigned R@1 here equals A[t][p].
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .checks import check_rows
from .forgetting import _r1, exact
from .measures import _pair_index, _parts, _procrustes_rotation, _unit
from .retrieval import retrieval_metrics

#: Ridge penalties tried by cross-validation, as multiples of the mean eigenvalue of XᵀX (= N / d for
#: N unit rows in d dimensions), so that the grid means the same shrinkage whatever N and d:
#: from 10⁻⁴ (almost least squares) to 10⁴ (almost the zero map), one per decade.
RIDGE_GRID = tuple(10.0 ** k for k in range(-4, 5))
REALIGNMENTS = ("cross_orthogonal", "modality_orthogonal", "cross_linear")


def _check_pairs(what: str, **named: torch.Tensor) -> None:
    """check_rows, and at least one row in each: a map fitted on nothing or a probe of no pairs has
    no R@1 (scikit-learn would fail later with a message about its penalty grid)."""
    check_rows(what, nonzero=True, **named)
    empty = next((k for k, x in named.items() if x.shape[0] == 0), None)
    if empty is not None:
        raise ValueError(f"{what}: {empty} has no rows; at least one pair is needed")


def _split(what: str, name: str, x) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(image, text, caption_image) of a DomainEmbeddings or an (image, text[, caption_image]) tuple,
    refused with a ValueError from `what` naming `name`_image or `name`_text when a row holds NaN or
    inf or is zero (no direction), or when it has no rows."""
    image, text, ci = _parts(x, None)
    _check_pairs(what, **{f"{name}_image": image, f"{name}_text": text})
    _pair_index(ci, image.shape[0], text.shape[0])  # one caption per image unless caption_image says otherwise
    return image, text, ci


def cross_orthogonal_map(image: torch.Tensor, text: torch.Tensor,
                         caption_image: torch.Tensor | None = None) -> torch.Tensor:
    """Q = argmin_{Q ∈ O(d)} ‖V Q − U‖_F over the calibration pairs (V: unit text rows, U: the unit
    image row of each caption), float64 [d, d]: the rotation (or reflection) that best turns the text
    space onto the image space (`measures._procrustes_rotation`, closest to I where the pairs leave
    directions free)."""
    _check_pairs("cross_orthogonal_map", image=image, text=text)
    pair_image = _pair_index(caption_image, image.shape[0], text.shape[0])
    return _procrustes_rotation(_unit(text), _unit(image)[pair_image])


def modality_orthogonal_maps(calibration, base_calibration) -> tuple[torch.Tensor, torch.Tensor]:
    """(R_I, R_T): each modality's Procrustes rotation from the checkpoint's calibration embeddings to
    the base model's (same samples, same rows), R = argmin_{R ∈ O(d)} ‖X R − X_base‖_F on unit rows,
    float64 [d, d]. `calibration`, `base_calibration`: DomainEmbeddings or (image, text) tuples."""
    image, text, _ = _split("modality_orthogonal_maps", "calibration", calibration)
    base_image, base_text, _ = _split("modality_orthogonal_maps", "base_calibration", base_calibration)
    for what, x, y in (("image", image, base_image), ("text", text, base_text)):
        if x.shape != y.shape:
            raise ValueError(f"modality_orthogonal_maps: calibration_{what} {tuple(x.shape)} vs "
                             f"base_calibration_{what} {tuple(y.shape)}: rows must be the same samples")
    return (_procrustes_rotation(_unit(image), _unit(base_image)),
            _procrustes_rotation(_unit(text), _unit(base_text)))


def cross_linear_map(image: torch.Tensor, text: torch.Tensor, caption_image: torch.Tensor | None = None,
                     grid=RIDGE_GRID) -> tuple[torch.Tensor, float]:
    """(W, α): the ridge map text → image, W = argmin ‖V W − U‖²_F + α ‖W‖²_F over the calibration
    pairs (unit rows, no intercept), float64 [d, d], with α chosen among grid × N / d by
    scikit-learn's RidgeCV (efficient leave-one-out cross-validation of the squared error, one α for
    every output column)."""
    # Imported here: scikit-learn takes seconds to import and only the analysis needs it.
    from sklearn.linear_model import RidgeCV

    _check_pairs("cross_linear_map", image=image, text=text)
    pair_image = _pair_index(caption_image, image.shape[0], text.shape[0])
    x, y = _unit(text).numpy(), _unit(image)[pair_image].numpy()
    scale = x.shape[0] / x.shape[1]  # mean eigenvalue of XᵀX for unit rows
    ridge = RidgeCV(alphas=np.asarray(grid, dtype=np.float64) * scale, fit_intercept=False).fit(x, y)
    return torch.from_numpy(np.ascontiguousarray(ridge.coef_.T)), float(ridge.alpha_)


def _scored_r1(image: torch.Tensor, text: torch.Tensor, caption_image) -> float:
    """The accuracy matrix's cell for these embeddings (float32 retrieval, as A[t][p] is taken)."""
    return _r1(retrieval_metrics(image.float(), text.float(), caption_image))


def _mapped(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """normalise(unit(x) M): a map's image of unit rows, back on the sphere retrieval compares on."""
    return F.normalize(_unit(x) @ m, dim=-1)


def realigned_r1(probe, calibration, base_calibration, *, grid=RIDGE_GRID) -> dict:
    """R@1 of one checkpoint's probe pairs as they are and under each realignment fitted on its
    calibration pairs.

    `probe`, `calibration`: the checkpoint's embeddings of the probe set and of its calibration split;
    `base_calibration`: the base model's of the same calibration split (the per-modality target);
    each a DomainEmbeddings or an (image, text[, caption_image]) tuple. Returns {"now",
    "cross_orthogonal", "modality_orthogonal", "cross_linear" (each an R@1 in [0, 1]), "alpha" (the
    ridge penalty chosen), "pairs" (calibration pairs), "dim"}. Passing the base for all three
    gives the reference of `realignment`."""
    image, text, ci = _split("realigned_r1", "probe", probe)
    cal_image, cal_text, cal_ci = _split("realigned_r1", "calibration", calibration)
    if cal_image.shape[1] != image.shape[1]:
        raise ValueError(f"realignment: calibration has {cal_image.shape[1]} dimensions, probe {image.shape[1]}")
    q = cross_orthogonal_map(cal_image, cal_text, cal_ci)
    r_image, r_text = modality_orthogonal_maps(calibration, base_calibration)
    w, alpha = cross_linear_map(cal_image, cal_text, cal_ci, grid)
    return {"now": _scored_r1(image, text, ci),
            "cross_orthogonal": _scored_r1(image, _mapped(text, q), ci),
            "modality_orthogonal": _scored_r1(_mapped(image, r_image), _mapped(text, r_text), ci),
            "cross_linear": _scored_r1(image, _mapped(text, w), ci),
            "alpha": alpha, "pairs": int(cal_text.shape[0]), "dim": int(image.shape[1])}


def recovered_share(realigned: float, *, now: float, reference: float, base: float,
                    min_loss: float = 0.0) -> float | None:
    """(realigned − now) / (reference − now): the share of the way from the checkpoint's R@1 to the
    reference that the realignment covers, computed on R@1's exact grid and rounded once.

    None, never a number, where there is no loss to share out: nothing forgotten (base − now ≤
    min_loss, `base` being the base model's R@1 on the same probes, unrealigned) or nothing to recover
    towards (reference − now ≤ min_loss). On the exact grid equal counts are equal, so min_loss = 0
    needs no rounding margin. Not clipped: below 0 the map made retrieval worse, above 1 it beat the
    reference. NaN or inf raise ValueError naming the argument."""
    check_rows("recovered_share", realigned=realigned, now=now, reference=reference, base=base)
    r, n, ref, b = exact(realigned), exact(now), exact(reference), exact(base)
    lost = min(b - n, ref - n)
    if lost <= 0 or float(lost) <= min_loss:
        return None
    return float((r - n) / (ref - n))


def realignment(probe, calibration, base_probe, base_calibration, *, reference: dict | None = None,
                grid=RIDGE_GRID, min_loss: float = 0.0) -> dict:
    """Realigned R@1 and recovered share of one checkpoint on one old probe set, per realignment.

    `probe`, `calibration`: the checkpoint's embeddings of the probe set and its calibration split;
    `base_probe`, `base_calibration`: the base model's of the same samples (DomainEmbeddings or
    (image, text[, caption_image]) tuples). `reference`: `realigned_r1(base_probe, base_calibration,
    base_calibration)` when already computed (it is the same for every checkpoint of a run).
    Returns {"now", "base", "pairs", "dim", and per realignment in REALIGNMENTS {"realigned",
    "reference", "share"}}, cross_linear also {"alpha", "reference_alpha"}; JSON-ready. The share is
    `recovered_share` (the base's own R@1 as `base`): None where nothing was lost."""
    inputs = (("probe", probe), ("calibration", calibration), ("base_probe", base_probe),
              ("base_calibration", base_calibration))
    parts = {name: _split("realignment", name, x) for name, x in inputs}
    (image, text, _), (base_image, base_text, _) = parts["probe"], parts["base_probe"]
    if (base_image.shape, base_text.shape) != (image.shape, text.shape):
        raise ValueError(f"realignment: probe {tuple(image.shape)}, {tuple(text.shape)} vs base_probe "
                         f"{tuple(base_image.shape)}, {tuple(base_text.shape)}: rows must be the same samples")
    now = realigned_r1(probe, calibration, base_calibration, grid=grid)
    if reference is None:
        reference = realigned_r1(base_probe, base_calibration, base_calibration, grid=grid)
    out = {"now": now["now"], "base": reference["now"], "pairs": now["pairs"], "dim": now["dim"]}
    for name in REALIGNMENTS:
        out[name] = {"realigned": now[name], "reference": reference[name],
                     "share": recovered_share(now[name], now=now["now"], reference=reference[name],
                                              base=reference["now"], min_loss=min_loss)}
    out["cross_linear"].update(alpha=now["alpha"], reference_alpha=reference["alpha"])
    return out
