"""Disorder or loss? Whether an old probe set's lost retrieval is Spatial Disorder (the spaces turned
out of step, the information still there) or information gone, and whether the disorder comes
before the loss (docs/definitions.md, "Realignment and recovered share", "Lead/lag and forecast").

For one run (`run_entry`, per strategy, into analysis.json):
- realignment: at every phase end after an old probe set was learned, its R@1 as it is and under
  each realignment fitted on its calibration split (geomlab.geometry.realign), against the model
  that learned it under the same realignment; and the final loss split into what a rotation
  recovers, what only a linear map recovers, and what nothing recovers;
- series: along the fine traces (`train.trace_every`), each old probe set's R@1 and its geometry
  against the model that learned it (`disorder_scalars`), and the lag at which each geometry
  measure's rise best leads R@1's fall (`lead_lag`).
Across seeds (`aggregate`, for a study and, with one seed, for a run): the same as mean ± CI, and the
forecast test (`forecast_errors`, leave one seed out), which needs two seeds at least.
"""
from __future__ import annotations

from geomlab.geometry import DISORDER_SCALARS, disorder_scalars_series, forecast_errors, lead_lag, realigned_r1, realignment, retrieval_metrics
from geomlab.geometry.forgetting import _r1
from geomlab.geometry.inference import mean_ci
from geomlab.geometry.realign import REALIGNMENTS
from geomlab.probe_kinds import SEEN_KIND, calibration_name
from geomlab.traces import read_trace

MEASURES = DISORDER_SCALARS
ORTHOGONAL = ("cross_orthogonal", "modality_orthogonal")
PARTS = ("rotation", "linear_only", "not_recovered")
MAX_LAG = 5            # traces either way (at train.trace_every = 10: 50 steps)
FORECAST_HORIZON = 3   # traces ahead
FORECAST_HISTORY = 3   # traces of history in each model
MIN_SERIES = FORECAST_HISTORY + FORECAST_HORIZON + 1  # shorter series have no forecast window


def loss_split(r: dict) -> dict | None:
    """One realignment entry's lost R@1 (the learning model's R@1 − now) split in the proportions of
    the recovered shares: "rotation" = lost × the best orthogonal share, "linear_only" = lost × what
    the linear map adds beyond it, "not_recovered" = the rest; shares clipped to [0, 1] (a map that
    makes retrieval worse recovers nothing; one that beats the reference recovers everything). None
    where nothing was lost (every share None)."""
    shares = {name: r[name]["share"] for name in REALIGNMENTS}
    if all(v is None for v in shares.values()):
        return None
    clip = lambda v: min(1.0, max(0.0, v or 0.0))  # noqa: E731
    rotation = max(clip(shares[n]) for n in ORTHOGONAL)
    linear = max(rotation, clip(shares["cross_linear"]))
    lost = r["base"] - r["now"]
    return {"lost": lost, "rotation": lost * rotation, "linear_only": lost * (linear - rotation),
            "not_recovered": lost * (1.0 - linear)}


def realignment_rows(cks: list, traces: dict, domains: list, kinds: list, learned: list | None,
                     rows: list[int]) -> dict | None:
    """Realignment of every old seen probe set that has a calibration split, at every phase end after
    the phase that learned it (`rows`: the checkpoint index of each phase end, row 0 the base), where
    every one of those traces holds the calibration set (`domains`: the scored probe sets; their
    calibration sets are read from the traces by name). {"probes": {probe: {"learned_at", "rows":
    [{"row", "label", **realignment}], "split": loss_split at the last row}}}; None without
    calibration splits or a phase mapping."""
    if learned is None:
        return None
    out = {}
    for p, name in enumerate(domains):
        cal = calibration_name(name)
        t_p = learned[p]
        if kinds[p] != SEEN_KIND or t_p is None or t_p >= len(rows) - 1 or not all(
                cal in traces[cks[k].key][0].domains for k in rows[t_p:]):
            continue
        ref = traces[cks[rows[t_p]].key][0].domains
        entries = []
        for t in range(t_p + 1, len(rows)):
            now = traces[cks[rows[t]].key][0].domains
            try:  # a NaN, inf or zero row of the calibration set, named with its checkpoint
                if not entries:
                    reference = realigned_r1(ref[name], ref[cal], ref[cal])
                r = realignment(now[name], now[cal], ref[name], ref[cal], reference=reference)
            except ValueError as e:
                raise ValueError(f"{cks[rows[t_p]].label} → {cks[rows[t]].label}, probe set {name!r} and "
                                 f"{cal!r}: {e}") from None
            entries.append({"row": t, "label": cks[rows[t]].label, **r})
        out[name] = {"learned_at": t_p, "rows": entries, "split": loss_split(entries[-1])}
    return {"probes": out} if out else None


def _fine_r1(e) -> float:
    return _r1(retrieval_metrics(e.image.float(), e.text.float(), e.caption_image))


def fine_series(run, strategy_dir: str, domains: list, kinds: list, learned: list | None,
                read=read_trace) -> dict | None:
    """Along the fine traces of the base (phase 0) and of `strategy_dir` (later phases): for each old
    seen probe set, R@1 on the traced rows and `disorder_scalars` against the last fine trace of the
    phase that learned it, at every later fine trace; and `lead_lag` of each measure against R@1.
    None when the run has no fine traces (train.trace_every = 0) or no phase mapping. `read`: how a
    trace file is read (the analyser passes a cached reader: every strategy shares the base's traces)."""
    if learned is None:
        return None
    fine = [f for f in run.fine_traces("base") if f[0] == 0] + [f for f in run.fine_traces(strategy_dir) if f[0] > 0]
    if not fine:
        return None
    loaded = [(phase, step, read(path)) for phase, step, path in fine]
    last_phase = max(phase for phase, _, _ in loaded)
    out = {}
    for p, name in enumerate(domains):
        t_p = learned[p]
        if kinds[p] != SEEN_KIND or t_p is None or t_p >= last_phase:
            continue
        at = [k for k, (phase, _, _) in enumerate(loaded) if phase == t_p]
        if not at:
            continue
        ref = loaded[at[-1]][2].domains[name]
        later = loaded[at[-1] + 1:]
        series = {"phase": [ph for ph, _, _ in later], "step": [st for _, st, _ in later],
                  "r1": [_fine_r1(tr.domains[name]) for _, _, tr in later]}
        values = disorder_scalars_series(ref, [tr.domains[name] for _, _, tr in later])
        for m in MEASURES:
            series[m] = [v[m] for v in values]
        series["lead_lag"] = {m: lead_lag(series[m], series["r1"], max_lag=MAX_LAG) for m in MEASURES}
        series["learned_at"], series["rows"] = t_p, int(ref.image.shape[0])
        out[name] = series
    return {"trace_every": _trace_every(loaded), "probes": out} if out else None


def _trace_every(loaded: list) -> int | None:
    """The step spacing of the fine traces (the most common within a phase)."""
    gaps = [b[1] - a[1] for a, b in zip(loaded, loaded[1:]) if a[0] == b[0] and b[1] > a[1]]
    return max(set(gaps), key=gaps.count) if gaps else None


# ----------------------------------------------------------------------------- across seeds


def _mean_over_probes(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def aggregate(entries: list[dict | None], seeds: list) -> dict | None:
    """One strategy's "disorder_or_loss" across seeds (`entries`: each seed's run_entry, None where a
    seed has none): the final loss split per old probe set and the recovered shares (mean ± CI over
    seeds), the lead/lag per measure (per seed the mean lag over old probe sets, then mean ± CI), and
    the forecast errors (None with fewer than two seeds)."""
    entries = [(e, s) for e, s in zip(entries, seeds) if e]
    if not entries:
        return None
    out: dict = {"seeds": [s for _, s in entries]}
    realigned = [(e["realignment"]["probes"], s) for e, s in entries if e.get("realignment")]
    if realigned:
        probes = list(dict.fromkeys(p for r, _ in realigned for p in r))
        out["realignment"] = {}
        for p in probes:
            last = [r[p]["rows"][-1] if p in r else None for r, _ in realigned]
            splits = [r[p]["split"] if p in r else None for r, _ in realigned]
            out["realignment"][p] = {
                "now": mean_ci([x and x["now"] for x in last]), "base": mean_ci([x and x["base"] for x in last]),
                **{part: mean_ci([sp and sp[part] for sp in splits]) for part in ("lost", *PARTS)},
                "share": {name: mean_ci([x and x[name]["share"] for x in last]) for name in REALIGNMENTS},
                "realigned": {name: mean_ci([x and x[name]["realigned"] for x in last]) for name in REALIGNMENTS}}
    series = [(e["series"]["probes"], s) for e, s in entries if e.get("series")]
    if series:
        out["lead_lag"] = {}
        for m in MEASURES:
            lags = [_mean_over_probes([p["lead_lag"][m]["lag"] for p in sr.values()]) for sr, _ in series]
            corr = [_mean_over_probes([p["lead_lag"][m]["correlation"] for p in sr.values()]) for sr, _ in series]
            curve = [[_mean_over_probes([p["lead_lag"][m]["correlations"][k] for p in sr.values()])
                      for sr, _ in series] for k in range(2 * MAX_LAG + 1)]
            out["lead_lag"][m] = {"lag": mean_ci(lags), "correlation": mean_ci(corr), "lags": list(range(-MAX_LAG, MAX_LAG + 1)),
                                  "curve": [mean_ci(col) for col in curve]}
        r1, geometry, owners = [], [], []
        for sr, s in series:
            for p in sr.values():
                if len(p["r1"]) >= MIN_SERIES:
                    r1.append(p["r1"])
                    geometry.append([[p[m][t] for m in MEASURES] for t in range(len(p["r1"]))])
                    owners.append(s)
        out["forecast"] = (forecast_errors(r1, geometry, owners, horizon=FORECAST_HORIZON, history=FORECAST_HISTORY)
                           if len(set(owners)) > 1 else None)
    return out


# ----------------------------------------------------------------------------- reading it


def _pm(h: dict | None, spec: str = ".3f") -> str:
    """mean ± CI half-width of a mean_ci entry; "n/a" where there is no mean."""
    if not h or h.get("mean") is None:
        return "n/a"
    half = f" ± {(h['ci'][1] - h['ci'][0]) / 2:{spec.lstrip('+')}}" if h.get("ci") else ""
    return f"{h['mean']:{spec}}{half}"


def summary_line(name: str, d: dict | None) -> str | None:
    """One console line of a strategy's disorder_or_loss: the old probe sets' lost R@1 and how much of
    it a rotation and a linear map recover (summed over old probe sets: mean over seeds), the measure
    that best leads R@1's fall, and the forecast errors."""
    if not d:
        return None
    parts = []
    realigned = d.get("realignment")
    if realigned:
        probes = list(realigned)
        total = {k: _sum_means([realigned[p][k] for p in probes]) for k in ("lost", *PARTS)}
        parts.append(f"{len(probes)} old probe set(s) lost {_fmt(total['lost'])} R@1: rotation recovers "
                     f"{_fmt(total['rotation'])}, a linear map {_fmt(total['linear_only'])} more, "
                     f"{_fmt(total['not_recovered'])} not recovered")
    ll = d.get("lead_lag")
    if ll:
        parts.append("lag of the best lead (traces; + = geometry first): " + ", ".join(
            f"{LABELS[m]} {_pm(ll[m]['lag'], '+.1f')}" for m in MEASURES))
    f = d.get("forecast")
    if f:
        parts.append(f"forecast RMSE {FORECAST_HORIZON} traces ahead: history {_pm(f['history_error'])}, "
                     f"+ geometry {_pm(f['geometry_error'])}")
    return f"  {name:<10} disorder or loss: " + "; ".join(parts) if parts else None


LABELS = {"rotation_image": "θ img", "rotation_text": "θ txt", "desync": "desync", "alignment_drift": "Δφ"}


def _sum_means(entries: list[dict]) -> float | None:
    means = [e["mean"] for e in entries if e and e.get("mean") is not None]
    return sum(means) if means else None


def _fmt(v) -> str:
    # figures.summary.format_number, which this module cannot import (geomlab.figures imports it)
    return "n/a" if v is None else f"{v:.3f}"
