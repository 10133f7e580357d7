"""Plotly figures over an analysis object (see docs/analysis_schema.md)."""
from __future__ import annotations

import html
import json
from pathlib import Path

import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

IMAGE_COLOR, TEXT_COLOR = "#1f77b4", "#d62728"
PALETTE = qualitative.Plotly


def esc(s) -> str:
    """HTML-escape text from the data before plotly renders it (plotly interprets some HTML)."""
    return html.escape(str(s), quote=True)


def load(path) -> dict:
    """Read an analysis.json (or the analysis/ directory holding one)."""
    p = Path(path)
    if p.is_dir():
        p = p / "analysis.json"
    return json.loads(p.read_text())


def _strategies(a: dict, strategies=None) -> list[str]:
    names = list(a["strategies"])
    return names if strategies is None else [s for s in strategies if s in a["strategies"]]


def _grid(a, strategies, rows: int = 1, row_titles=None, specs=None, **kw):
    names = _strategies(a, strategies)
    fig = make_subplots(rows=rows, cols=len(names), subplot_titles=[esc(n) for n in names] if rows == 1 else
                        [esc(n) if r == 0 else "" for r in range(rows) for n in names],
                        shared_yaxes=kw.pop("shared_yaxes", True), horizontal_spacing=0.06, vertical_spacing=0.12,
                        row_titles=row_titles, specs=specs, **kw)
    return fig, names


def _labels(s: dict) -> list[str]:
    """Short axis labels: "base p0:200" for the base checkpoint, "p2:150" for phase 2 step 150, else the stem."""
    out = []
    for c in s["checkpoints"]:
        if c.get("phase") is None:
            out.append(esc(c["label"]))
        else:
            out.append(("base " if c.get("strategy_dir") == "base" else "") + f"p{c['phase']}:{c['step']}")
    return out


def _domain(a: dict, domain) -> str:
    return a["domains"][0] if domain is None else domain


def _pairs(s: dict, reference: str) -> list:
    return s["vs_base" if reference == "base" else "vs_previous"]


def _value(pair: dict | None, domain, getter):
    """getter(pair[domain]); with domain == "mean", the mean over domains (None where missing)."""
    if pair is None:
        return None
    if domain == "mean":
        vals = [getter(v) for v in pair.values()]
        vals = [v for v in vals if v is not None]
        return sum(vals) / len(vals) if vals else None
    return getter(pair[domain])


def _layout(fig, title, height=420, **kw):
    fig.update_layout(title=title, height=height, template="plotly_white", margin=dict(l=60, r=20, t=80, b=60),
                      legend=dict(orientation="h", y=-0.18), **kw)
    return fig


# ---------------------------------------------------------------------------------------------
# retrieval and forgetting


def _row_label(s: dict, k: int) -> str:
    c = s["checkpoints"][k]
    return f"after phase {c['phase']}" if c.get("phase") is not None else esc(c["label"])


def accuracy_matrices(a: dict, strategies=None) -> go.Figure:
    """A[t][d] (mean of the two R@1) per strategy, as heatmaps side by side."""
    names = _strategies(a, strategies)
    rows = {n: [_row_label(a["strategies"][n], k) for k in a["strategies"][n]["accuracy"]["row_checkpoints"]]
            for n in names}
    same = len({tuple(r) for r in rows.values()}) <= 1
    fig, names = _grid(a, strategies, shared_yaxes=same)
    for j, name in enumerate(names, 1):
        acc = a["strategies"][name]["accuracy"]
        z = acc["matrix"]
        fig.add_trace(go.Heatmap(z=z, x=[esc(d) for d in acc["domains"]], y=rows[name],
                                 zmin=0, zmax=1, colorscale="Viridis", showscale=j == len(names),
                                 text=[[f"{v:.2f}" if v is not None else "" for v in row] for row in z],
                                 texttemplate="%{text}", hovertemplate="%{y}<br>on %{x}: %{z:.3f}<extra></extra>"),
                      row=1, col=j)
        fig.update_yaxes(autorange="reversed", row=1, col=j)
    return _layout(fig, "Accuracy matrix A[t][d] (mean R@1 on probe set d after phase t)",
                   height=max(320, 140 + 40 * max(len(r) for r in rows.values())))


def forgetting_curves(a: dict, strategies=None) -> go.Figure:
    """Mean R@1 of every probe set across checkpoints, one panel per strategy."""
    fig, names = _grid(a, strategies)
    for j, name in enumerate(names, 1):
        s = a["strategies"][name]
        x = _labels(s)
        for k, d in enumerate(a["domains"]):
            y = [0.5 * (r[d]["image_to_text_R@1"] + r[d]["text_to_image_R@1"]) for r in s["retrieval"]]
            fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", name=esc(d), legendgroup=esc(d),
                                     showlegend=j == 1, line=dict(color=PALETTE[k % len(PALETTE)])), row=1, col=j)
    fig.update_yaxes(range=[0, 1.02], title_text="mean R@1", col=1)
    return _layout(fig, "Forgetting curves: retrieval on every probe set across checkpoints")


def zeroshot_accuracy(a: dict, strategies=None) -> go.Figure:
    """Zero-shot top-1 accuracy of every zero-shot set across checkpoints, one panel per strategy
    (the trainer's numbers; gaps where a checkpoint has none)."""
    fig, names = _grid(a, strategies)
    sets = list(dict.fromkeys(k for n in names for z in a["strategies"][n].get("zeroshot") or [] if z for k in z))
    for j, name in enumerate(names, 1):
        s = a["strategies"][name]
        x = _labels(s)
        for k, z in enumerate(sets):
            y = [(row or {}).get(z) for row in s.get("zeroshot") or []]
            fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", name=esc(z), legendgroup=esc(z),
                                     showlegend=j == 1, line=dict(color=PALETTE[k % len(PALETTE)])), row=1, col=j)
    fig.update_yaxes(range=[0, 1.02], title_text="top-1 accuracy", col=1)
    return _layout(fig, "Zero-shot classification: top-1 accuracy across checkpoints")


def has_zeroshot(a: dict) -> bool:
    """Whether any checkpoint of the analysis carries zero-shot accuracies."""
    return any(z for s in a["strategies"].values() for z in s.get("zeroshot") or [])


# ---------------------------------------------------------------------------------------------
# Spatial Disorder


def rotation_angles(a: dict, domain=None, reference: str = "base", strategies=None) -> go.Figure:
    """Distribution of per-sample rotation angles θ (box: p10/p25/median/p75/p90) per checkpoint,
    image against text, against the base checkpoint (`reference="base"`) or the previous one."""
    domain = _domain(a, domain)
    fig, names = _grid(a, strategies)
    for j, name in enumerate(names, 1):
        s = a["strategies"][name]
        x = _labels(s)
        for mod, color in (("image", IMAGE_COLOR), ("text", TEXT_COLOR)):
            xs, st = [], []
            for lab, p in zip(x, _pairs(s, reference)):
                if p is not None:
                    xs.append(lab)
                    st.append(p[domain]["rotation"][mod])
            if not xs:
                continue
            fig.add_trace(go.Box(x=xs, q1=[v["p25"] for v in st], median=[v["median"] for v in st],
                                 q3=[v["p75"] for v in st], lowerfence=[v["p10"] for v in st],
                                 upperfence=[v["p90"] for v in st], mean=[v["mean"] for v in st],
                                 name=mod, legendgroup=mod, showlegend=j == 1, marker_color=color,
                                 boxpoints=False), row=1, col=j)
    fig.update_layout(boxmode="group")
    fig.update_yaxes(title_text="θ (degrees)", col=1)
    ref = "the base checkpoint" if reference == "base" else "the previous checkpoint"
    return _layout(fig, f"Rotation angles against {ref} — probe {esc(domain)} (whiskers p10–p90)")


def _scalar_traces(a, strategies, domain, reference, series, title, ytitle, height=420):
    """Line figure: for each (label, getter, color, dash) in `series`, the value per checkpoint."""
    fig, names = _grid(a, strategies)
    for j, name in enumerate(names, 1):
        s = a["strategies"][name]
        x = _labels(s)
        for label, getter, color, dash in series:
            y = [_value(p, domain, getter) for p in _pairs(s, reference)]
            fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", name=label, legendgroup=label,
                                     showlegend=j == 1, line=dict(color=color, dash=dash)), row=1, col=j)
    fig.update_yaxes(title_text=ytitle, col=1)
    return _layout(fig, title, height=height)


def _where(domain):
    return "mean over probe sets" if domain == "mean" else f"probe {esc(domain)}"


def topology_drift(a: dict, domain="mean", reference: str = "base", strategies=None) -> go.Figure:
    """Topology drift |SAM^b − SAM^a| (mean and p90 over pairs i ≠ j) per checkpoint and modality."""
    series = [(f"{m} {q}", (lambda v, m=m, q=q: v["topology_drift"][m][q]), c, dash)
              for m, c in (("image", IMAGE_COLOR), ("text", TEXT_COLOR)) for q, dash in (("mean", "solid"), ("p90", "dot"))]
    exact = all(p[d]["topology_drift"][m]["exact"] for s in a["strategies"].values() for p in s["vs_base"] if p
                for d in p for m in ("image", "text"))
    how = "exact over all pairs" if exact else "some from a seeded sample of ≥10⁷ pairs"
    return _scalar_traces(a, strategies, domain, reference, series,
                          f"Topology drift ({how}) — {_where(domain)}", "drift (degrees)")


def rigid_share(a: dict, domain="mean", reference: str = "base", strategies=None) -> go.Figure:
    """Rigid share 1 − ‖A R − B‖²/‖A − B‖² of the orthogonal Procrustes fit, per modality, with the
    mean and max eigen-angle of R and the linear CKA."""
    series = [("image rigid share", lambda v: v["procrustes"]["image"]["rigid_share"], IMAGE_COLOR, "solid"),
              ("text rigid share", lambda v: v["procrustes"]["text"]["rigid_share"], TEXT_COLOR, "solid"),
              ("image CKA", lambda v: v["cka"]["image"], IMAGE_COLOR, "dot"),
              ("text CKA", lambda v: v["cka"]["text"], TEXT_COLOR, "dot"),
              ("image mutual 10-NN", lambda v: v["mutual_knn"]["image"], IMAGE_COLOR, "dash"),
              ("text mutual 10-NN", lambda v: v["mutual_knn"]["text"], TEXT_COLOR, "dash")]
    fig = _scalar_traces(a, strategies, domain, reference, series,
                         f"Rigid share of the change, CKA and mutual k-NN — {_where(domain)}", "share / similarity")
    fig.update_yaxes(range=[0, 1.05])
    return fig


def rotation_spectrum(a: dict, domain=None, modalities=("image", "text"), reference: str = "base",
                      strategies=None) -> go.Figure:
    """Histogram of the eigen-angles of the Procrustes rotation R (its rotation spectrum) per checkpoint,
    one row per modality."""
    domain = _domain(a, domain)
    names = _strategies(a, strategies)
    fig = make_subplots(rows=len(modalities), cols=len(names), shared_xaxes=True, shared_yaxes=True,
                        vertical_spacing=0.08, horizontal_spacing=0.06,
                        subplot_titles=[esc(n) for n in names] + [""] * (len(names) * (len(modalities) - 1)))
    for r, modality in enumerate(modalities, 1):
        for j, name in enumerate(names, 1):
            s = a["strategies"][name]
            xs, z, h = [], [], None
            for lab, p in zip(_labels(s), _pairs(s, reference)):
                if p is not None:
                    h = p[domain]["procrustes"][modality]["spectrum"]["hist"]
                    xs.append(lab)
                    z.append(h["counts"])
            if not z:
                continue
            width = (h["hi"] - h["lo"]) / len(h["counts"])
            ys = [h["lo"] + (b + 0.5) * width for b in range(len(h["counts"]))]
            fig.add_trace(go.Heatmap(x=xs, y=ys, z=[list(col) for col in zip(*z)], colorscale="Magma",
                                     reversescale=True, showscale=r == 1 and j == len(names), coloraxis=None,
                                     hovertemplate=f"%{{x}}<br>{modality}: angle %{{y:.0f}}°: %{{z}} eigenvalues<extra></extra>"),
                          row=r, col=j)
        fig.update_yaxes(title_text=f"{modality}: eigen-angle (°)", row=r, col=1)
    return _layout(fig, f"Rotation spectrum of R (eigen-angles) — probe {esc(domain)}", height=300 + 250 * len(modalities))


def deviation(a: dict, domain="mean", reference: str = "base", strategies=None) -> go.Figure:
    """The inter-modal deviation trace: mismatch δ, alignment drift Δφ, desynchronisation angle
    (eigen-angles of R_Iᵀ R_T, mean and max) and the modality gap, one row each."""
    names = _strategies(a, strategies)
    rows = [("mismatch δ (°)", [("δ mean", lambda v: v["deviation"]["mismatch"]["mean"], "#9467bd", "solid"),
                                ("δ p90", lambda v: v["deviation"]["mismatch"]["p90"], "#9467bd", "dot")]),
            ("alignment drift Δφ (°)", [("Δφ mean", lambda v: v["deviation"]["alignment_drift"]["mean"], "#2ca02c", "solid"),
                                        ("Δφ p90", lambda v: v["deviation"]["alignment_drift"]["p90"], "#2ca02c", "dot")]),
            ("desync (°)", [("desync mean", lambda v: v["deviation"]["desync"]["mean"], "#ff7f0e", "solid"),
                            ("desync max", lambda v: v["deviation"]["desync"]["max"], "#ff7f0e", "dot")])]
    fig = make_subplots(rows=4, cols=len(names), shared_xaxes=True, vertical_spacing=0.05, horizontal_spacing=0.06,
                        subplot_titles=[esc(n) for n in names] + [""] * (3 * len(names)))
    for j, name in enumerate(names, 1):
        s = a["strategies"][name]
        x = _labels(s)
        for r, (_, series) in enumerate(rows, 1):
            for label, getter, color, dash in series:
                y = [_value(p, domain, getter) for p in _pairs(s, reference)]
                fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", name=label, legendgroup=label,
                                         showlegend=j == 1, line=dict(color=color, dash=dash)), row=r, col=j)
        gap = [(sum(g.values()) / len(g)) if domain == "mean" else g[domain] for g in s["modality_gap"]]
        fig.add_trace(go.Scatter(x=x, y=gap, mode="lines+markers", name="modality gap", legendgroup="gap",
                                 showlegend=j == 1, line=dict(color="#8c564b")), row=4, col=j)
    for r, (title, _) in enumerate(rows, 1):
        fig.update_yaxes(title_text=title, row=r, col=1)
    fig.update_yaxes(title_text="‖mean I − mean T‖", row=4, col=1)
    return _layout(fig, f"Inter-modal deviation — {_where(domain)}", height=900)


def flips(a: dict, domain="mean", reference: str = "base", strategies=None) -> go.Figure:
    """R@1 flips (forgotten: right at the reference, wrong now; learned: the reverse) and the ROC AUC
    with which Δφ and δ predict a forgotten query, per direction."""
    names = _strategies(a, strategies)
    fig = make_subplots(rows=2, cols=len(names), shared_xaxes=True, vertical_spacing=0.08, horizontal_spacing=0.06,
                        subplot_titles=[esc(n) for n in names] + [""] * len(names))
    dirs = (("image_to_text", "solid", "i→t"), ("text_to_image", "dot", "t→i"))
    for j, name in enumerate(names, 1):
        s = a["strategies"][name]
        x = _labels(s)
        for direction, dash, short in dirs:
            for key, color, row in (("forgotten", "#d62728", 1), ("learned", "#2ca02c", 1),
                                    ("auc_alignment_drift", "#1f77b4", 2), ("auc_mismatch", "#9467bd", 2)):
                label = f"{key.replace('auc_', 'AUC ')} {short}"
                y = [_value(p, domain, lambda v: v["flips"][direction][key]) for p in _pairs(s, reference)]
                fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", name=label, legendgroup=label,
                                         showlegend=j == 1, line=dict(color=color, dash=dash)), row=row, col=j)
        fig.add_hline(y=0.5, line=dict(color="#999", width=1, dash="dash"), row=2, col=j)
    fig.update_yaxes(title_text="fraction of queries", range=[0, 1.02], row=1, col=1)
    fig.update_yaxes(title_text="ROC AUC → forgotten", range=[0, 1.02], row=2, col=1)
    return _layout(fig, f"Flips and how deviation predicts them — {_where(domain)}", height=650)


# ---------------------------------------------------------------------------------------------
# the sphere


def _sphere_mesh():
    import numpy as np
    u, v = np.meshgrid(np.linspace(0, 2 * np.pi, 25), np.linspace(0, np.pi, 13))
    return go.Surface(x=np.cos(u) * np.sin(v), y=np.sin(u) * np.sin(v), z=np.cos(v), opacity=0.08, showscale=False,
                      colorscale=[[0, "#888"], [1, "#888"]], hoverinfo="skip")


def sphere(a: dict, strategy: str | None = None) -> go.Figure:
    """Probe embeddings projected on the sphere (3-component PCA fitted at the base checkpoint,
    each point scaled to unit length) at every checkpoint of one strategy, with a slider.
    Colour: probe set; circles: images; diamonds: texts (the legend says both); hover: the caption.

    One trace per (probe set, modality), holding its points' captions once; the slider moves the
    points (`restyle` of x, y, z). A trace per checkpoint repeated every caption at every
    checkpoint: about 70% of a report's bytes."""
    name = strategy or next(iter(a["strategies"]))
    s = a["strategies"][name]
    samples = a["sphere"]["samples"]
    domains = a["domains"]
    labels = _labels(s)
    first = s["sphere"][0]
    traces, keys = [], []
    for di, d in enumerate(domains):
        caps = samples[d].get("captions")
        hover = [esc(caps[i] if caps else f"id {samples[d]['ids'][i]}") for i in range(len(first[d]["image"]))]
        for mod, symbol in (("image", "circle"), ("text", "diamond")):
            xyz = first[d][mod]
            keys.append((d, mod))
            traces.append(dict(
                type="scatter3d", x=[p[0] for p in xyz], y=[p[1] for p in xyz], z=[p[2] for p in xyz],
                mode="markers", name=mod, legendgroup=esc(d), legendgrouptitle=dict(text=f"probe set {esc(d)}"),
                visible=True, marker=dict(size=3 if mod == "image" else 2.5, color=PALETTE[di % len(PALETTE)],
                                          symbol=symbol, opacity=0.85),
                hovertext=[f"{esc(d)} · {mod}<br>{c}" for c in hover], hoverinfo="text"))
    steps = []
    for k, pts in enumerate(s["sphere"]):
        # (trace 0 is the sphere's mesh)
        moved = {axis: [[p[i] for p in pts[d][mod]] for d, mod in keys] for i, axis in enumerate("xyz")}
        steps.append(dict(method="restyle", args=[moved, list(range(1, len(keys) + 1))], label=labels[k]))
    layout = go.Layout(sliders=[dict(active=0, steps=steps, currentvalue=dict(prefix="checkpoint: "), pad=dict(t=30))],
                       scene=dict(aspectmode="cube", xaxis_title="PC1", yaxis_title="PC2", zaxis_title="PC3"),
                       legend=dict(title_text="colour: probe set · ● image ◆ text", groupclick="togglegroup",
                                   itemsizing="constant"),
                       height=620, template="plotly_white", margin=dict(l=0, r=0, t=60, b=0),
                       title=f"{esc(name)}: probe embeddings on the sphere (PCA fitted at {esc(a['sphere']['fit_at'])})")
    # The traces are built from fixed, known-good properties (the layout above is checked), so the
    # figure takes them unchecked: plotly's check of every point list cost a quarter of an analysis.
    return go.Figure([_sphere_mesh(), *traces], layout=layout, _validate=False)


def figures(a: dict) -> list[tuple[str, str, go.Figure, str]]:
    """Every figure of the report, in order, as (section id, section title, figure, caption): the
    caption says in a sentence or two what the figure measures and how to read it."""
    d = _domain(a, None)
    out = [("accuracy", "Accuracy matrices", accuracy_matrices(a),
            "A[t][p]: mean R@1 (image→text and text→image) on probe set p after phase t; row 0 is the base model. "
            "Read down a column to see a probe set forgotten while later phases train on other data."),
           ("forgetting", "Forgetting curves", forgetting_curves(a),
            "Mean R@1 on every probe set at every checkpoint, one panel per strategy: a falling line is a probe "
            "set being forgotten, a rising one a probe set being learned."),
           *([("zeroshot", "Zero-shot classification", zeroshot_accuracy(a),
               "Top-1 zero-shot classification accuracy (each image against its set's class names in a prompt) "
               "at every checkpoint, one line per set; chance is one over the number of classes (1/4 for "
               "ShapeWorld's shape and colour sets). A falling line: the model loses the concept zero-shot.")]
             if has_zeroshot(a) else []),
           ("rotation", "Rotation angles, image against text", rotation_angles(a),
            f"The angle θ by which each probe {d} embedding turned from the base checkpoint, images (blue) against "
            "texts (red); boxes span p25–p75, whiskers p10–p90. Higher boxes: the space turned further; a gap "
            "between the colours: the modalities turned by different amounts."),
           ("topology", "Topology drift", topology_drift(a),
            "How much the angles between pairs of probe embeddings changed from the base checkpoint (mean and p90 "
            "over pairs), averaged over probe sets. A rotation leaves it at 0; it grows when the structure changes."),
           ("rigid", "Rigid share", rigid_share(a),
            "The share of the change from the base checkpoint that one orthogonal rotation explains (1: a pure "
            "rotation), with linear CKA and the mutual 10-NN overlap (1: the same structure), averaged over probe sets."),
           ("spectrum", "Rotation spectrum", rotation_spectrum(a),
            f"The eigen-angles of the best-fitting rotation R from the base checkpoint, probe {d}, one row per "
            "modality: darker cells higher up mean R turns more directions by larger angles."),
           ("deviation", "Inter-modal deviation", deviation(a),
            "The two modalities against each other from the base checkpoint, averaged over probe sets: mismatch "
            "δ = |θ_image − θ_text|, alignment drift Δφ (change in each pair's image–text angle), desync (the "
            "angles of R_Iᵀ R_T, 0 when both spaces turn together) and the modality gap."),
           ("flips", "Flip analysis", flips(a),
            "The share of retrieval queries right at the base checkpoint and wrong now (forgotten) or the reverse "
            "(learned), and the ROC AUC with which Δφ and δ pick out the forgotten ones (0.5: chance).")]
    from .disorder import disorder_sections  # imported here: figures.disorder imports this module
    out += disorder_sections(a.get("disorder_or_loss"))
    for i, name in enumerate(a["strategies"]):
        out.append((f"sphere-{i}", f"Sphere: {name}", sphere(a, name),
                    f"{name}'s probe embeddings on the sphere: a 3-component PCA fitted at {a['sphere']['fit_at']}, "
                    "each point scaled to unit length; the slider steps through checkpoints. Colour: probe set; "
                    "circle: image, diamond: text; hover a point for its caption."))
    return out
