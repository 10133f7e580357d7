"""Plotly figures over a study (analysis.json "geomlab.study/1", docs/analysis_schema.md): the mean
across seeds with its 95% confidence band, retention against plasticity, geometry against forgetting."""
from __future__ import annotations

import plotly.graph_objects as go
from plotly.colors import hex_to_rgb
from plotly.subplots import make_subplots

from geomlab.geometry.inference import ALL_EQUAL, MIN_CLUSTERS

from .disorder import disorder_sections
from .plots import IMAGE_COLOR, PALETTE, TEXT_COLOR, _grid, _labels, _layout, esc
from .summary import format_number

# headline keys (geomlab.study) -> how the report names them, and the number format
METRIC_LABELS = {
    "last": ("Last", ".3f"), "avg": ("Avg", ".3f"), "bwt": ("BWT", "+.3f"), "mean_forgetting": ("mean forgetting", ".3f"),
    "transfer": ("Transfer", ".3f"), "domain0_r1": ("domain-0 R@1", ".3f"), "last_domain_r1": ("last-domain R@1", ".3f"),
    "domain0_forgetting": ("domain-0 forgetting", ".3f"),
    "vs_base.rotation_image": ("θ image (°)", ".1f"), "vs_base.rotation_text": ("θ text (°)", ".1f"),
    "vs_base.rigid_share_image": ("rigid share image", ".2f"), "vs_base.rigid_share_text": ("rigid share text", ".2f"),
    "vs_base.desync": ("desync (°)", ".1f"), "vs_base.alignment_drift": ("alignment drift Δφ (°)", ".1f"),
    "vs_base.modality_gap": ("modality gap", ".3f"), "vs_base.forgotten": ("forgotten i→t", ".2f"),
    "vs_base.auc_alignment_drift": ("AUC Δφ→forgotten", ".2f"),
    "weight_distance": ("weight distance", ".4f"), "domain0_r1_drop": ("domain-0 R@1 drop", ".3f"),
}

# geometry curves (figures.summary.pair_numbers keys): one row each, with the modality pairs together
GEOMETRY_ROWS = [("θ mean (°)", [("rotation_image", "image", IMAGE_COLOR), ("rotation_text", "text", TEXT_COLOR)]),
                 ("rigid share", [("rigid_share_image", "image", IMAGE_COLOR), ("rigid_share_text", "text", TEXT_COLOR)]),
                 ("desync (°)", [("desync", "desync", "#ff7f0e")]),
                 ("Δφ mean (°)", [("alignment_drift", "alignment drift", "#2ca02c")]),
                 ("modality gap", [("modality_gap", "modality gap", "#8c564b")])]


def label(key: str) -> str:
    return METRIC_LABELS.get(key, (key, ".3f"))[0]


def fmt(key: str, v) -> str:
    return format_number(v, METRIC_LABELS.get(key, (key, ".3f"))[1])


def _rgba(color: str, alpha: float) -> str:
    r, g, b = hex_to_rgb(color)
    return f"rgba({r},{g},{b},{alpha})"


def _band_traces(fig, x, band: dict, name: str, color: str, *, row: int, col: int, showlegend: bool) -> None:
    """The mean as a line, its 95% CI as a shaded band (none where the CI does not exist)."""
    lo = [ci[0] if ci else None for ci in band["ci"]]
    hi = [ci[1] if ci else None for ci in band["ci"]]
    if any(v is not None for v in lo):
        fig.add_trace(go.Scatter(x=x, y=hi, mode="lines", line=dict(width=0), hoverinfo="skip", showlegend=False,
                                 legendgroup=name), row=row, col=col)
        fig.add_trace(go.Scatter(x=x, y=lo, mode="lines", line=dict(width=0), fill="tonexty",
                                 fillcolor=_rgba(color, 0.18), hoverinfo="skip", showlegend=False, legendgroup=name),
                      row=row, col=col)
    same = band.get("all_equal") or [False] * len(band["n"])
    text = [f"n = {n}" + (f", 95% CI [{c[0]:.3g}, {c[1]:.3g}]" if c else f", {ALL_EQUAL}" if e else ", no CI")
            for n, c, e in zip(band["n"], band["ci"], same)]
    fig.add_trace(go.Scatter(x=x, y=band["mean"], mode="lines+markers", name=name, legendgroup=name,
                             showlegend=showlegend, line=dict(color=color), text=text,
                             hovertemplate=f"{name}<br>%{{x}}: %{{y:.3f}}<br>%{{text}}<extra></extra>"),
                  row=row, col=col)


def _x(st: dict, name: str) -> list[str]:
    return _labels(st["curves"][name])


def _seeds_note(st: dict) -> str:
    n = len(st["seeds"])
    if n == 2:
        return "mean over 2 seeds, band: 95% CI from 2 seeds (descriptive only)"
    return f"mean over {n} seeds, band: 95% CI" if n > 1 else "one seed: no confidence band"


def few_seeds_note(st: dict) -> str:
    """A sentence for captions and notes where the intervals come from two seeds; "" otherwise."""
    if len(st["seeds"]) != 2:
        return ""
    return (" With 2 seeds every interval rests on one degree of freedom (t₀.₉₇₅ = 12.7): it is wide and "
            "describes the two runs; it is not evidence for or against a difference.")


def accuracy_mean(st: dict) -> go.Figure:
    """The accuracy matrix A[t][p] per strategy, averaged over seeds (cell text: mean ± CI half-width)."""
    names = [n for n in st["strategies"] if st["accuracy"].get(n)]
    fig, names = _grid(st, names, shared_yaxes=False)
    for j, name in enumerate(names, 1):
        acc = st["accuracy"][name]
        seeds = len(st["seeds"])
        ns = acc.get("n") or [[seeds] * len(r) for r in acc["mean"]]
        text = [[("" if m is None else f"{m:.2f}") + (f"±{(c[1] - c[0]) / 2:.2f}" if c and m is not None else "")
                 + (f" (n={n})" if m is not None and n < seeds else "")
                 for m, c, n in zip(mr, cr, nr)] for mr, cr, nr in zip(acc["mean"], acc["ci"], ns)]
        rows = [f"after phase {t}" if t is not None else esc(r) for t, r in zip(acc["row_phases"], acc["rows"])]
        fig.add_trace(go.Heatmap(z=acc["mean"], x=[esc(d) for d in acc["domains"]], y=rows,
                                 zmin=0, zmax=1, colorscale="Viridis", showscale=j == len(names), text=text,
                                 texttemplate="%{text}", hovertemplate="%{y}<br>on %{x}: %{text}<extra></extra>"),
                      row=1, col=j)
        fig.update_yaxes(autorange="reversed", row=1, col=j)
    rows = max((len(st["accuracy"][n]["rows"]) for n in names), default=1)
    return _layout(fig, f"Accuracy matrix A[t][p], {_seeds_note(st)}", height=max(320, 140 + 40 * rows))


def _curve_bands(st: dict, curve: str, y_title: str, title: str) -> go.Figure:
    """One panel per strategy: every set's `curve` across checkpoints, band = 95% CI over seeds."""
    fig, names = _grid(st, None)
    for j, name in enumerate(names, 1):
        for k, (d, band) in enumerate(st["curves"][name][curve].items()):
            _band_traces(fig, _x(st, name), band, esc(d), PALETTE[k % len(PALETTE)], row=1, col=j, showlegend=j == 1)
    fig.update_yaxes(range=[0, 1.02], title_text=y_title, col=1)
    return _layout(fig, f"{title} ({_seeds_note(st)})")


def forgetting_bands(st: dict) -> go.Figure:
    """Mean R@1 of every probe set across checkpoints, one panel per strategy, band = 95% CI over seeds."""
    return _curve_bands(st, "r1", "mean R@1", "Forgetting curves")


def zeroshot_bands(st: dict) -> go.Figure:
    """Zero-shot top-1 accuracy of every zero-shot set across checkpoints, band = 95% CI over seeds."""
    return _curve_bands(st, "zeroshot", "top-1 accuracy", "Zero-shot classification")


def geometry_bands(st: dict) -> go.Figure:
    """Domain 0's Spatial Disorder against the base checkpoint across checkpoints: mean rotation, rigid
    share, desynchronisation, alignment drift and modality gap, one row each, band = 95% CI over seeds."""
    names = list(st["strategies"])
    fig = make_subplots(rows=len(GEOMETRY_ROWS), cols=len(names), shared_xaxes=True, vertical_spacing=0.04,
                        horizontal_spacing=0.06, subplot_titles=[esc(n) for n in names]
                        + [""] * (len(names) * (len(GEOMETRY_ROWS) - 1)))
    shown = set()  # "image" and "text" label two rows: one legend entry each
    for j, name in enumerate(names, 1):
        curves = st["curves"][name]["vs_base"]
        for r, (_, series) in enumerate(GEOMETRY_ROWS, 1):
            for key, legend, color in series:
                if key in curves:
                    _band_traces(fig, _x(st, name), curves[key], legend, color, row=r, col=j,
                                 showlegend=legend not in shown)
                    shown.add(legend)
    for r, (title, _) in enumerate(GEOMETRY_ROWS, 1):
        fig.update_yaxes(title_text=title, row=r, col=1)
    return _layout(fig, f"Spatial Disorder of probe {esc(st['geometry_probe'])} against the base checkpoint "
                        f"({_seeds_note(st)})", height=1000)


def _error(h: dict) -> dict | None:
    """Plotly error bars from a mean ± CI entry; None where the CI does not exist."""
    if not h.get("ci") or h.get("mean") is None:
        return None
    return dict(type="data", symmetric=False, array=[h["ci"][1] - h["mean"]], arrayminus=[h["mean"] - h["ci"][0]])


def retention_plasticity(st: dict) -> go.Figure:
    """Final domain-0 R@1 (retention) against final last-domain R@1 (plasticity), one point per
    strategy at its mean over seeds, error bars = 95% CI."""
    fig = go.Figure()
    for k, name in enumerate(st["strategies"]):
        h = st["headline"][name]
        x, y = h.get("last_domain_r1", {}), h.get("domain0_r1", {})
        if x.get("mean") is None or y.get("mean") is None:
            continue
        fig.add_trace(go.Scatter(
            x=[x["mean"]], y=[y["mean"]], mode="markers+text", name=esc(name), text=[esc(name)],
            textposition="top center", marker=dict(size=12, color=PALETTE[k % len(PALETTE)]),
            error_x=_error(x), error_y=_error(y),
            hovertemplate=f"{esc(name)}<br>last-domain R@1 %{{x:.3f}}<br>domain-0 R@1 %{{y:.3f}}"
                          f"<br>{len(x['values'])} seeds<extra></extra>"))
    fig.update_xaxes(title_text="plasticity: final R@1 on the last domain", rangemode="tozero")
    fig.update_yaxes(title_text="retention: final R@1 on domain 0", rangemode="tozero")
    return _layout(fig, f"Retention against plasticity ({_seeds_note(st).replace('band', 'bars')})", height=520)


def _rho_text(r: dict | None, name: str = "ρ") -> str:
    if r is None or r["rho"] is None:
        return f"{name} n/a"
    ci = f" [{r['ci'][0]:.2f}, {r['ci'][1]:.2f}]" if r["ci"] else ""
    return f"{name} = {r['rho']:.2f}{ci}, n = {r['n']}"


def geometry_vs_forgetting(st: dict) -> go.Figure:
    """Domain 0's geometry (last checkpoint against base) against domain 0's forgetting, one point per
    (strategy, seed), one panel per measure titled with Spearman's ρ and its bootstrap 95% CI."""
    g = st["geometry_vs_forgetting"]
    measures = g["measures"]
    cols = 3
    rows = (len(measures) + cols - 1) // cols
    fig = make_subplots(rows=rows, cols=cols, horizontal_spacing=0.08, vertical_spacing=0.16,
                        subplot_titles=[f"{label(m)}: {_rho_text(g['spearman'][m])}"
                                        + (f"<br>{_rho_text(g['partial'][m], 'partial ρ')}"
                                           if g.get("partial", {}).get(m) else "") for m in measures])
    for k, name in enumerate(st["strategies"]):
        pts = [p for p in g["points"] if p["strategy"] == name]
        for i, m in enumerate(measures):
            fig.add_trace(go.Scatter(
                x=[p[m] for p in pts], y=[p[g["forgetting"]] for p in pts], mode="markers", name=esc(name),
                legendgroup=esc(name), showlegend=i == 0, marker=dict(size=9, color=PALETTE[k % len(PALETTE)]),
                text=[f"{esc(name)}, seed {p['seed']}" for p in pts],
                hovertemplate=f"%{{text}}<br>{label(m)} %{{x:.3g}}<br>domain-0 forgetting %{{y:.3f}}<extra></extra>"),
                row=i // cols + 1, col=i % cols + 1)
            fig.update_xaxes(title_text=label(m), row=i // cols + 1, col=i % cols + 1)
    for r in range(1, rows + 1):
        fig.update_yaxes(title_text="domain-0 forgetting", row=r, col=1)
    return _layout(fig, f"Geometry against forgetting, probe {esc(st['geometry_probe'])}: one point per "
                        "(strategy, seed)", height=380 * rows + 120)


def _rho_caption(st: dict) -> str:
    """How far the correlations can be read: as evidence only with enough strategies and seeds."""
    k = len({p["strategy"] for p in st["geometry_vs_forgetting"]["points"]})
    if k < MIN_CLUSTERS or len(st["seeds"]) < 3:
        return (f"With {k} strategies and {len(st['seeds'])} seed(s) the correlations are descriptive, not evidence"
                + (f": an interval needs at least {MIN_CLUSTERS} strategies." if k < MIN_CLUSTERS else "."))
    return ("A ρ whose interval excludes 0 says that the measure ranks the forgetting across methods; a partial ρ "
            "that does too, that it does so beyond how far the weights moved.")


def study_figures(st: dict) -> list[tuple[str, str, go.Figure, str]]:
    """Every figure of the study report, in order, as (section id, title, figure, caption)."""
    band = ("The line is the mean over seeds; the shaded band its 95% confidence interval (t-interval), "
            "absent with one seed and where every seed gives the same value (hover: \"all seeds equal\")."
            + few_seeds_note(st))
    out = [("accuracy", "Accuracy matrices", accuracy_mean(st),
            "A[t][p]: mean R@1 (image→text and text→image) on probe set p after phase t, averaged over seeds; each "
            "cell shows mean ± the half-width of its 95% CI (n where fewer seeds have the cell). Read down a column "
            "to see a probe set forgotten." + few_seeds_note(st)),
           ("forgetting", "Forgetting curves", forgetting_bands(st),
            "Mean R@1 on every probe set at every checkpoint, one panel per strategy. " + band)]
    if any(st["curves"][n]["zeroshot"] for n in st["strategies"]):
        out.append(("zeroshot", "Zero-shot classification", zeroshot_bands(st),
                    "Top-1 zero-shot classification accuracy of every zero-shot set at every checkpoint. " + band))
    out += [("geometry", "Spatial Disorder across checkpoints", geometry_bands(st),
             f"How far probe {st['geometry_probe']}'s embeddings moved from the base checkpoint: mean rotation angle, "
             "rigid share of the change, desynchronisation of the two modalities' rotations, alignment drift and "
             "the modality gap. " + band),
            ("retention", "Retention against plasticity", retention_plasticity(st),
             "Each strategy's final R@1 on domain 0 (what it kept) against its final R@1 on the last domain "
             "(what it learned last), at the mean over seeds with 95% CI error bars. Up and to the right is better."
             + few_seeds_note(st)),
            ("geometry-forgetting", "Geometry against forgetting", geometry_vs_forgetting(st),
             "Each point is one (strategy, seed): domain 0's geometry at the last checkpoint against the base (and "
             "the weight distance), against domain 0's forgetting. Panel titles give Spearman's ρ across all points "
             "with its seeded cluster-bootstrap 95% CI (strategies resampled, all seeds of each), and the partial ρ "
             "given the weight distance. " + _rho_caption(st))]
    return out + disorder_sections(st.get("disorder_or_loss"))
