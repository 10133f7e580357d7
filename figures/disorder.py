"""The report's "Disorder or loss?" section (geomlab.disorder): each old probe set's lost R@1 split into
what a rotation recovers, what only a linear map recovers and what nothing recovers; the lead/lag of
each geometry measure against R@1's fall; the forecast errors. One shape for a study and for a single
run (analysis.json "disorder_or_loss": strategy -> geomlab.disorder.aggregate)."""
from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from geomlab.disorder import FORECAST_HISTORY, FORECAST_HORIZON, LABELS, MAX_LAG, MEASURES, PARTS

from .plots import PALETTE, _layout, esc

PART_STYLE = {"rotation": ("recovered by a rotation", "#2ca02c"),
              "linear_only": ("recovered only by a linear map", "#ff7f0e"),
              "not_recovered": ("not recovered", "#7f7f7f")}


def _ci_text(h: dict | None) -> str:
    if not h or h.get("mean") is None:
        return "n/a"
    ci = f" [{h['ci'][0]:.3f}, {h['ci'][1]:.3f}]" if h.get("ci") else (" (all seeds equal)" if h.get("all_equal")
                                                                       else " (no CI)")
    return f"{h['mean']:.3f}{ci}, n = {h['n']}"


def loss_split_figure(d: dict) -> go.Figure:
    """Stacked bars, one per (strategy, old probe set): the three parts of the lost R@1 (mean over
    seeds); the error bar on the top is the CI of the whole loss; hover gives each part's CI."""
    fig = go.Figure()
    bars = [(name, probe, r) for name, e in d.items() if e and e.get("realignment")
            for probe, r in e["realignment"].items()]
    x = [[esc(name) for name, _, _ in bars], [esc(probe) for _, probe, _ in bars]]
    for part in PARTS:
        title, color = PART_STYLE[part]
        fig.add_trace(go.Bar(x=x, y=[r[part]["mean"] for _, _, r in bars], name=title, marker_color=color,
                             hovertext=[f"{title}: {_ci_text(r[part])}<br>lost: {_ci_text(r['lost'])}"
                                        for _, _, r in bars], hoverinfo="text"))
    lost = [r["lost"] for _, _, r in bars]
    fig.add_trace(go.Scatter(x=x, y=[h["mean"] for h in lost], mode="markers", marker=dict(color="black", size=4),
                             name="lost (95% CI)", error_y=dict(
                                 type="data", symmetric=False,
                                 array=[h["ci"][1] - h["mean"] if h.get("ci") else 0 for h in lost],
                                 arrayminus=[h["mean"] - h["ci"][0] if h.get("ci") else 0 for h in lost])))
    _layout(fig, "Lost R@1 of each old probe set at the last phase end, split by what realignment recovers",
            barmode="stack", yaxis_title="R@1 lost since the probe set was learned")
    return fig


def lead_lag_figure(d: dict) -> go.Figure:
    """Per measure, the correlation of the measure's rise with R@1's fall at each lag (mean over seeds
    and old probe sets), one line per strategy."""
    fig = make_subplots(rows=1, cols=len(MEASURES), shared_yaxes=True,
                        subplot_titles=[LABELS[m] for m in MEASURES])
    lags = list(range(-MAX_LAG, MAX_LAG + 1))
    for i, (name, e) in enumerate((n, e) for n, e in d.items() if e and e.get("lead_lag")):
        for col, m in enumerate(MEASURES, start=1):
            curve = e["lead_lag"][m]["curve"]
            fig.add_trace(go.Scatter(
                x=lags, y=[c["mean"] for c in curve], mode="lines+markers", name=esc(name), legendgroup=name,
                showlegend=col == 1, line=dict(color=PALETTE[i % len(PALETTE)]),
                error_y=dict(type="data", symmetric=False,
                             array=[c["ci"][1] - c["mean"] if c.get("ci") else 0 for c in curve],
                             arrayminus=[c["mean"] - c["ci"][0] if c.get("ci") else 0 for c in curve])),
                row=1, col=col)
            fig.update_xaxes(title_text="lag (traces; > 0: geometry first)", row=1, col=col)
    fig.update_yaxes(title_text="corr(rise of measure, fall of R@1)", row=1, col=1)
    _layout(fig, "Lead/lag of each geometry measure against R@1's fall", height=420)
    return fig


def forecast_figure(d: dict) -> go.Figure:
    """The forecast errors as a table: per strategy, RMSE of R@1's own history and with geometry, and
    their paired difference (negative: geometry forecasts better)."""
    rows = [(name, e["forecast"]) for name, e in d.items() if e and e.get("forecast")]
    diff = [f["difference"] for _, f in rows]
    cells = [[esc(n) for n, _ in rows], [_ci_text(f["history_error"]) for _, f in rows],
             [_ci_text(f["geometry_error"]) for _, f in rows],
             [("n/a" if c["mean_difference"] is None else f"{c['mean_difference']:+.4f}"
               + (f" [{c['ci'][0]:+.4f}, {c['ci'][1]:+.4f}]" if c.get("ci") else "")
               + (f" p {c['p_value']:.2g}" if c.get("p_value") is not None else "")) for c in diff]]
    fig = go.Figure(go.Table(header=dict(values=["strategy", "RMSE, R@1 history", "RMSE, + geometry",
                                                 "difference (geometry − history)"]), cells=dict(values=cells)))
    _layout(fig, f"Forecast of R@1 {FORECAST_HORIZON} traces ahead (leave one seed out)", height=140 + 30 * len(rows))
    return fig


def disorder_sections(d: dict | None) -> list[tuple[str, str, go.Figure, str]]:
    """The "Disorder or loss?" figures that `d` has data for, as (section id, title, figure, caption)."""
    if not d:
        return []
    sections = [
        ("realignment", "disorder-or-loss", "Disorder or loss?", loss_split_figure,
         "Each old probe set's R@1 lost between the phase that learned it and the last phase, split by "
         "realignment fitted on its calibration split: green is what one rotation brings back (cross-modal "
         "or per modality back to the learning model, whichever recovers more), orange what only a general "
         "linear map adds, grey what no linear map recovers. Mean over seeds; the black bar is the 95% CI "
         "of the whole loss. If Spatial Disorder caused the forgetting, green would fill most of each bar; "
         "grey means the information is gone, not turned."),
        ("lead_lag", "lead-lag", "Does disorder come first?", lead_lag_figure,
         "Along the fine traces, the correlation between each geometry measure's rise and R@1's fall "
         "when the measure is shifted by a lag (in traces): a peak at a positive lag means the geometry "
         "moves before retrieval falls, as it would if disorder drove the forgetting; a peak at 0 means "
         "they move together; negative, R@1 falls first. Mean over seeds and old probe sets, 95% CI bars."),
        ("forecast", "forecast", "Does disorder forecast the fall?", forecast_figure,
         f"Root mean squared error of a least-squares forecast of R@1 {FORECAST_HORIZON} traces ahead from "
         f"its last {FORECAST_HISTORY} values (history) and from those plus the last {FORECAST_HISTORY} "
         "values of the four geometry measures, each seed held out in turn (mean and 95% CI over seeds). "
         "If disorder drives the fall, the geometry forecast has the smaller error."),
    ]
    return [(sid, title, figure(d), caption) for key, sid, title, figure, caption in sections
            if any(e and e.get(key) for e in d.values())]
