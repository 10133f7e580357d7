"""The tuning report (python -m geomlab.tune): per strategy, each metric against the knob's value,
every validation seed's point and their mean, the chosen value marked; the table below."""
from __future__ import annotations

import html
import math
from pathlib import Path

import plotly.graph_objects as go

from geomlab.io import atomic_write_text

from .report import _page

COLOURS = {"last": "#1f77b4", "avg": "#2ca02c", "domain0_r1": "#d62728", "last_domain_r1": "#9467bd"}


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return math.fsum(values) / len(values) if values else None


def strategy_figure(strategy: str, results: list, chosen: dict, columns: dict, criterion: str) -> go.Figure:
    rows = [r for r in results if r.point is not None and r.point.strategy == strategy]
    values = sorted({r.point.value for r in rows})
    fig = go.Figure()
    for key, name in columns.items():
        by_value = {v: [r.metrics.get(key) for r in rows if r.point.value == v and r.status == "done"] for v in values}
        fig.add_trace(go.Scatter(x=values, y=[_mean(by_value[v]) for v in values], mode="lines+markers", name=name,
                                 legendgroup=key, line={"color": COLOURS[key], "width": 3 if key == criterion else 1.5}))
        xs = [v for v in values for _ in by_value[v]]
        fig.add_trace(go.Scatter(x=xs, y=[y for v in values for y in by_value[v]], mode="markers", showlegend=False,
                                 legendgroup=key, marker={"color": COLOURS[key], "size": 5, "opacity": 0.5},
                                 hovertext=[f"seed {r.seed}" for v in values for r in rows
                                            if r.point.value == v and r.status == "done"], name=f"{name} (each seed)"))
    pick = chosen[strategy]["value"]
    if pick is not None:
        fig.add_vline(x=pick, line_dash="dash", line_color="#444", annotation_text=f"chosen {pick:g}")
    positive = values and min(values) > 0 and max(values) / min(values) >= 10
    fig.update_layout(xaxis_title=f"{strategy}.{chosen[strategy]['option']}", yaxis_title="mean R@1",
                      xaxis_type="log" if positive else "linear", height=380, margin={"t": 30})
    return fig


def write_tuning_report(results: list, chosen: dict, config: dict, path) -> Path:
    from geomlab.tune import COLUMN_LABELS, CRITERIA, table_markdown
    tune = config["tune"]
    criterion = tune["criterion"]
    seeds = ", ".join(map(str, tune["validation_seeds"]))
    figs = [(f"tune-{s}", s, strategy_figure(s, results, chosen, COLUMN_LABELS, criterion),
             f"{s}: each metric against {s}.{chosen[s]['option']} — lines: the mean over validation seeds {seeds}; "
             f"dots: each seed. The thick line is the criterion ({CRITERIA[criterion]}); the dashed line marks the "
             "chosen value (highest mean criterion; ties go to the weaker regulariser). With two seeds the spread "
             "of the dots is all there is to judge noise by: no interval is drawn.")
            for s in chosen]
    md = table_markdown(results, chosen, criterion, tune["validation_seeds"])
    table = "<pre>" + html.escape(md) + "</pre>"
    note = (f"validation seeds {html.escape(seeds)} · criterion: mean {CRITERIA[criterion]} over them · "
            f"budget: {config['train']['steps']} steps per phase, base {config['train']['base_steps']}")
    path = Path(path)
    atomic_write_text(path, _page("geomlab tuning", note, table, figs))
    return path
