"""The headline numbers of an analysis: what the analyser's console summary and the report's table show."""
from __future__ import annotations


def headline_numbers(a: dict) -> dict[str, dict]:
    """strategy -> its accuracy (average R@1, mean forgetting, BWT) and, under "vs_base", the
    geometry of its last checkpoint against the base checkpoint on the first probe set (None when
    the series has a single checkpoint)."""
    d0 = a["domains"][0]
    out = {}
    for name, s in a["strategies"].items():
        acc = s["accuracy"]
        g = s["vs_base"][-1][d0] if len(s["vs_base"]) > 1 and s["vs_base"][-1] else None
        out[name] = {
            "checkpoints": len(s["checkpoints"]), "average": acc["average"],
            "mean_forgetting": acc["mean_forgetting"], "bwt": acc["bwt"],
            "vs_base": g and {
                "rotation_image": g["rotation"]["image"]["mean"], "rotation_text": g["rotation"]["text"]["mean"],
                "rigid_share_image": g["procrustes"]["image"]["rigid_share"],
                "desync": g["deviation"]["desync"]["mean"],
                "forgotten": g["flips"]["image_to_text"]["forgotten"],
                "auc_alignment_drift": g["flips"]["image_to_text"]["auc_alignment_drift"],
            },
        }
    return out
