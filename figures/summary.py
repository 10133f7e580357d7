"""The headline numbers of an analysis: what the analyser's console summary and the report's table show."""
from __future__ import annotations

from geomlab.geometry.forgetting import exact_mean


#: how an absent number (undefined, e.g. NaN, or not measured) is shown, in the console and the report
MISSING = "n/a"


def format_number(v, spec: str = ".3f") -> str:
    return MISSING if v is None else format(v, spec)


def pair_numbers(g: dict) -> dict:
    """The main geometry numbers of one PAIR on one probe set (docs/analysis_schema.md): mean rotation
    per modality, rigid share per modality, desynchronisation, alignment drift, the later checkpoint's
    modality gap, and the flips of image→text R@1."""
    return {
        "rotation_image": g["rotation"]["image"]["mean"], "rotation_text": g["rotation"]["text"]["mean"],
        "rigid_share_image": g["procrustes"]["image"]["rigid_share"],
        "rigid_share_text": g["procrustes"]["text"]["rigid_share"],
        "desync": g["deviation"]["desync"]["mean"], "alignment_drift": g["deviation"]["alignment_drift"]["mean"],
        "modality_gap": g["deviation"]["modality_gap"]["b"],
        "forgotten": g["flips"]["image_to_text"]["forgotten"],
        "auc_alignment_drift": g["flips"]["image_to_text"]["auc_alignment_drift"],
    }


def _mean_defined(values: list) -> float | None:
    """The mean of the values that exist, exact on R@1's grid (`geomlab.geometry.forgetting.exact_mean`)."""
    values = [v for v in values if v is not None]
    return exact_mean(values) if values else None


def headline_numbers(a: dict) -> dict[str, dict]:
    """strategy -> its accuracy metrics (Last, Avg, BWT, mean forgetting, Transfer; the final R@1 of
    the probe sets learned at phase 0, "domain 0", and of those learned at the last phase; domain 0's
    mean forgetting) and, under "vs_base", the geometry of its last checkpoint against the base
    checkpoint on `geometry_probe` (`pair_numbers`; None when the series has a single checkpoint). `geometry_probe` is the first probe set learned
    at phase 0, or the first probe set when the run does not say which is. These are on the seen probe
    sets; when the run has novel ones (captions held out of training: `accuracy.novel`), "novel"
    holds the same numbers (but "checkpoints") on those."""
    out = {}
    for name, s in a["strategies"].items():
        acc = s["accuracy"]
        out[name] = {"checkpoints": len(s["checkpoints"]), **_numbers(a, s, acc, a["domains"][0]),
                     # ‖θ − θ_base‖ / ‖θ_base‖ at the last checkpoint (None without .pt files, geomlab.weights)
                     "weight_distance": (s.get("weight_distance") or [None])[-1]}
        if acc.get("novel"):
            out[name]["novel"] = _numbers(a, s, acc["novel"], acc["novel"]["probes"][0])
    return out


def _numbers(a: dict, s: dict, acc: dict, first: str) -> dict:
    """headline_numbers of series `s` from `acc` (its accuracy entry or accuracy.novel); `first`: the
    geometry probe when no probe set is known to be learned at phase 0."""
    d0, last = acc.get("domain0"), acc.get("last_domain")
    probe = d0["probes"][0] if d0 else first
    g = s["vs_base"][-1][probe] if len(s["vs_base"]) > 1 and s["vs_base"][-1] else None
    return {
        "last": acc["last"], "avg": acc["avg"], "bwt": acc["bwt"],
        "mean_forgetting": acc["mean_forgetting"], "transfer": acc["transfer"],
        "domain0_r1": d0 and d0["r1"], "last_domain_r1": last and last["r1"], "geometry_probe": probe,
        "domain0_forgetting": d0 and _mean_defined([s["accuracy"]["forgetting"][a["domains"].index(p)]
                                                    for p in d0["probes"]]),
        "vs_base": g and pair_numbers(g),
    }
