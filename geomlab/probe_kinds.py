"""Probe-set kinds (ProbeSet.kind, run.json's probe_kinds) and the calibration split's names: one home
for both, free of torch so that geomlab.config can take its default from here."""
from __future__ import annotations

# ProbeSet.kind. SEEN_KIND: captions (ShapeWorld: attribute combinations) that also occur in training;
# NOVEL_KIND: captions held out of every train split (docs/definitions.md, "Held-out combinations");
# CALIBRATION_KIND: realignment-fit pairs of a seen probe set's data, never scored or reported
# (docs/definitions.md, "Calibration split"). run.json's probe_kinds records each probe set's kind.
SEEN_KIND, NOVEL_KIND, CALIBRATION_KIND = "seen", "novel", "calibration"
SCORED_KINDS = (SEEN_KIND, NOVEL_KIND)  # the kinds whose retrieval is measured and reported
CALIBRATION_SIZE = 512                  # data.calibration_size's default: pairs per calibration set
# A calibration set's name is its probe set's with this suffix; real-data part names cannot hold "/"
# (geomlab.data.phases._safe), so no probe set of another kind ends with it.
CALIBRATION_SUFFIX = "/calibration"


def calibration_name(probe_name: str) -> str:
    """The calibration set of probe set `probe_name` ("d0_basic" -> "d0_basic/calibration")."""
    return probe_name + CALIBRATION_SUFFIX


def probe_kind(name: str, kinds: dict | None = None) -> str:
    """The kind of probe set `name`: `kinds[name]` (run.json's probe_kinds, or ProbeSet.kind by name)
    where it says, else CALIBRATION_KIND for a calibration set's name (a run from before calibration
    sets, resumed, names none of them), else SEEN_KIND (runs from before novel probe sets)."""
    kind = (kinds or {}).get(name)
    if kind in (SEEN_KIND, NOVEL_KIND, CALIBRATION_KIND):
        return kind
    return CALIBRATION_KIND if name.endswith(CALIBRATION_SUFFIX) else SEEN_KIND
