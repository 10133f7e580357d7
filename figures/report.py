"""The HTML report: every figure of `geomlab.figures` with its caption, plotly.js inlined once, opens
offline. One page for an analysis, another for a study across seeds (figures/study.py)."""
from __future__ import annotations

import html
from pathlib import Path

import plotly.io as pio
from plotly.offline import get_plotlyjs

from geomlab.io import atomic_write_text

from .plots import figures
from .study import ALL_EQUAL, METRIC_LABELS, few_seeds_note, fmt, label, study_figures
from .summary import format_number as _f, headline_numbers

_ERROR_HOOK = """<script>
window.__geomlabErrors = [];
function __geomlabError(msg) {
  window.__geomlabErrors.push(String(msg));
  var el = document.getElementById('js-errors');
  if (el) { el.textContent = window.__geomlabErrors.join('\\n'); el.setAttribute('data-count', String(window.__geomlabErrors.length)); el.hidden = false; }
}
window.addEventListener('error', function (e) { __geomlabError((e && e.message) || 'script error'); });
window.addEventListener('unhandledrejection', function (e) {
  var r = e && e.reason; __geomlabError('unhandled rejection: ' + ((r && r.message) || r));
});
</script>"""

_DONE_HOOK = """<script>
window.addEventListener('load', function () {
  if (window.__geomlabErrors.length) { __geomlabError(window.__geomlabErrors.pop()); }
  setTimeout(function () {
    var divs = document.querySelectorAll('div.plotly-graph-div');
    var ok = 0;
    divs.forEach(function (d) { if (d.querySelector('svg.main-svg')) ok += 1; });
    document.body.setAttribute('data-figures', String(divs.length));
    document.body.setAttribute('data-figures-rendered', String(ok));
  }, 0);
});
</script>"""

_STYLE = """<style>
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1500px; padding: 0 20px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.9em; } td, th { padding: 3px 10px; border-bottom: 1px solid #eee; text-align: right; }
th:first-child, td:first-child { text-align: left; } .note { color: #666; font-size: 0.85em; }
.caption { color: #444; font-size: 0.9em; max-width: 60em; }
nav a { margin-right: 12px; font-size: 0.9em; } #js-errors { color: #b00; }
</style>"""


def _e(s) -> str:
    return html.escape(str(s), quote=True)


def _summary_table(a: dict) -> str:
    rows, probes = [], set()
    for name, h in headline_numbers(a).items():
        g = h["vs_base"] or {}
        probes.add(h["geometry_probe"])
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in (
            _e(name), h["checkpoints"], _f(h["last"]), _f(h["avg"]), _f(h["bwt"], "+.3f"), _f(h["mean_forgetting"]),
            _f(h["transfer"]), _f(h["domain0_r1"]), _f(h["last_domain_r1"]),
            _f(g.get("rotation_image"), ".1f"), _f(g.get("rotation_text"), ".1f"),
            _f(g.get("rigid_share_image"), ".2f"), _f(g.get("desync"), ".1f"), _f(g.get("forgotten"), ".2f"),
            _f(g.get("auc_alignment_drift"), ".2f"))) + "</tr>")
    head = ("strategy", "checkpoints", "Last", "Avg", "BWT", "mean forgetting", "Transfer", "domain-0 R@1",
            "last-domain R@1", "θ image (°)", "θ text (°)", "rigid share (image)", "desync (°)", "forgotten i→t",
            "AUC Δφ→forgotten")
    return (f"<table><tr>{''.join(f'<th>{_e(h)}</th>' for h in head)}</tr>{''.join(rows)}</table>"
            "<p class=note>Accuracy: mean R@1 (docs/definitions.md, \"Forgetting and BWT\"). Last: the final row "
            "of the accuracy matrix; Avg: over phases, the mean on the probe sets learned so far; BWT and "
            "forgetting: on those learned before the last phase; Transfer: on those not yet trained on; "
            "domain-0 / last-domain R@1: final R@1 on the probe sets learned at phase 0 / at the last phase. "
            "– where a value does not exist (a plain directory has no phases). Geometry columns: last "
            f"checkpoint against the base checkpoint, probe {_e(', '.join(sorted(probes)))}.</p>")


def _n(n: int, seeds: int) -> str:
    """" (n = k)" where a number rests on fewer seeds than the study has."""
    return f" <small>(n = {n})</small>" if n < seeds else ""


def _ci_cell(key: str, h: dict) -> str:
    """mean ± the half-width of its 95% CI (the mean alone with one seed, "all seeds equal" without
    spread), its n where fewer seeds than the study's have it; the seeds' values on hover."""
    if h is None or h["mean"] is None:
        return "<td>–</td>"
    values = ", ".join(_f(v, METRIC_LABELS.get(key, (key, ".3f"))[1]) for v in h["values"])
    half = f" ± {fmt(key, (h['ci'][1] - h['ci'][0]) / 2).lstrip('+')}" if h["ci"] else ""
    same = f" <small>({ALL_EQUAL})</small>" if h.get("all_equal") else ""
    return (f"<td title=\"n = {h['n']}: {_e(values)}\">{fmt(key, h['mean'])}{half}{same}"
            f"{_n(h['n'], len(h['values']))}</td>")


def _stores_row(st: dict, names: list) -> str:
    stores = st.get("stores") or {}
    return ("<tr><td>stores</td>" + "".join(f"<td class=stores>{_e(stores.get(n) or '–')}</td>" for n in names)
            + "</tr>")


def _rho_cells(r: dict | None) -> str:
    """ρ, its CI and p as three cells; – with the reason on hover where there is none."""
    if r is None:
        return "<td>–</td><td>–</td><td>–</td>"
    if r["rho"] is None:
        why = _e(r.get("reason") or "n/a")
        return f"<td title=\"{why}\">– <small>({why})</small></td><td>–</td><td>–</td>"
    ci = "–" if not r["ci"] else "[{:+.3f}, {:+.3f}]".format(*r["ci"])
    ci_title = _e(r.get("reason") or r.get("ci_method") or "")
    return (f"<td>{r['rho']:+.3f}</td><td title=\"{ci_title}\">{ci}</td>"
            f"<td title=\"{_e(r.get('p_method') or '')}\">{_f(r['p_value'], '.3g')}</td>")


def _study_tables(st: dict) -> str:
    """The headline numbers as mean ± CI, each strategy against the baseline, and the correlations."""
    keys = _study_rows(st)
    rows = _stores_row(st, st["strategies"]) + "".join(
        f"<tr><td>{_e(label(k))}</td>" + "".join(_ci_cell(k, st["headline"][n].get(k)) for n in st["strategies"])
        + "</tr>" for k in keys)
    seeds = ", ".join(map(str, st["seeds"]))
    parts = [f"<table><tr><th>metric</th>{''.join(f'<th>{_e(n)}</th>' for n in st['strategies'])}</tr>{rows}</table>",
             f"<p class=note>Mean over seeds {_e(seeds)} ± the half-width of the 95% confidence interval "
             "(t-interval, docs/definitions.md, \"Statistics across seeds\"); hover a cell for each seed's value. "
             f"Geometry rows (θ to AUC): last checkpoint against the base checkpoint, probe {_e(st['geometry_probe'])}. "
             "– where a value does not exist; \"all seeds equal\": no spread, hence no interval; (n = k): only k "
             "seeds have the number. stores: what the strategy keeps from earlier phases besides the weights. "
             "weight distance: ‖θ − θ_base‖ / ‖θ_base‖ at the last checkpoint (docs/definitions.md, "
             "\"Weight distance\")." + (f" <b>{_e(st['note'])}</b>." if st["note"] else "") + few_seeds_note(st) + "</p>"]
    cmp = st["comparison"]
    if cmp:
        others = list(cmp["rows"])
        body = ""
        for k in cmp["metrics"]:
            cells = []
            for n in others:
                c = cmp["rows"][n].get(k)
                if c is None or c["mean_difference"] is None:
                    cells.append("<td>–</td>")
                    continue
                if c.get("all_equal"):
                    rest = f"<br><small>{ALL_EQUAL}</small>"
                else:
                    rest = f"<br>[{fmt(k, c['ci'][0])}, {fmt(k, c['ci'][1])}]" if c["ci"] else ""
                    rest += f"<br>p = {c['p_value']:.3g}" if c["p_value"] is not None else ""
                    rest += f", Holm {c['p_holm']:.3g}" if c.get("p_holm") is not None else ""
                cells.append(f"<td>{'+' if c['mean_difference'] >= 0 else ''}"
                             f"{fmt(k, c['mean_difference']).lstrip('+')}{rest}{_n(c['n'], len(st['seeds']))}</td>")
            body += f"<tr><td>{_e(label(k))}</td>{''.join(cells)}</tr>"
        base = _e(cmp["baseline"])
        parts += [f"<h2 id=comparison>Against {base} on the same seeds</h2>",
                  f"<table><tr><th>metric</th>{''.join(f'<th>{_e(n)} − {base}</th>' for n in others)}"
                  f"</tr>{_stores_row(st, others)}{body}</table>",
                  f"<p class=note>Mean paired difference over the seeds, its 95% CI, the raw p-value of a "
                  f"{_e(cmp['test'])} and, after it, the p-value adjusted by "
                  f"{_e(cmp.get('correction') or 'Holm')}: read the adjusted one. A CI that spans 0 cannot separate "
                  f"the strategy from {_e(cmp['baseline'])}. \"all seeds equal\": every seed gives the same "
                  f"difference, so there is no interval and no test. Positive: the strategy's number is higher than "
                  f"{_e(cmp['baseline'])}'s." + few_seeds_note(st) + "</p>"]
    g = st["geometry_vs_forgetting"]
    body = "".join(
        f"<tr><td>{_e(label(m))}</td><td>{r['n']}</td><td>{r['clusters']}</td>{_rho_cells(r)}"
        f"{_rho_cells(g['partial'].get(m))}<td>{g['strategy_means'][m]['n']}</td>"
        f"{_rho_cells(g['strategy_means'][m])}</tr>"
        for m, r in g["spearman"].items())
    control = _e(label(g["control"]))
    parts += ["<h2 id=correlations>Geometry and weight distance against domain-0 forgetting</h2>",
              "<table><tr><th rowspan=2>measure</th><th colspan=5>over (strategy, seed) points</th>"
              f"<th colspan=3>partial, given {control}</th><th colspan=4>over strategy means</th></tr>"
              "<tr><th>points</th><th>strategies</th><th>Spearman ρ</th><th>95% CI</th><th>p</th>"
              "<th>ρ</th><th>95% CI</th><th>p</th><th>strategies</th><th>ρ</th><th>95% CI</th><th>p</th></tr>"
              f"{body}</table>",
              f"<p class=note>One point per (strategy, seed); a strategy's seeds are not independent points, so the "
              f"95% CI is a percentile cluster bootstrap that resamples strategies (all seeds of each drawn one), "
              f"{st['settings']['bootstrap_resamples']} resamples, seed {st['settings']['bootstrap_seed']}, and only "
              f"with at least {st['settings'].get('min_clusters', 5)} strategies; the same measure over the "
              f"strategies' means (one point each) gives the p that does not lean on the seeds' independence. "
              f"Partial: the ranks of the measure and of the forgetting each residualised on the ranks of the "
              f"{control}, then correlated: what the measure says about forgetting beyond how far the weights "
              f"moved. p: exact permutation test below {st['settings'].get('exact_below', 10)} points, else "
              f"scipy.stats.spearmanr (partial: a t-test on n − 3 degrees of freedom); no ρ at all below "
              f"{st['settings'].get('min_points', 5)} points (hover – for the reason).</p>"]
    w = st.get("within_strategy")
    if w:
        body = "".join(
            f"<tr><td>{_e(name)}</td>" + "".join(
                f"<td title=\"{_e(r.get('reason') or r.get('p_method') or '')}\">"
                + ("–" if r["rho"] is None else f"{r['rho']:+.2f}") + f" <small>(n = {r['n']}"
                + (f", p {r['p_value']:.2g}" if r["p_value"] is not None else "") + ")</small></td>"
                for r in row.values()) + "</tr>"
            for name, row in w["rows"].items())
        parts += ["<h2 id=within>Within each strategy</h2>",
                  f"<table><tr><th>strategy</th>{''.join(f'<th>{_e(label(m))}</th>' for m in w['measures'])}</tr>"
                  f"{body}</table>",
                  f"<p class=note>Spearman ρ of each measure against the {_e(label(w['drop']))} (domain-0 R@1 at the "
                  "base − at the checkpoint) over every checkpoint of every seed of one strategy (n points); does "
                  "the strategy that moves more, forget more, along its own runs? Checkpoints of one seed lie on "
                  "one trajectory: the n points are not independent.</p>"]
    links = " ".join(f'<a href="{_e(r["analysis"].rsplit("/", 1)[0])}/report.html">seed {r["seed"]}</a>'
                     for r in st["runs"] if r.get("analysis"))
    if links:
        parts.append(f"<p class=note>Each seed's own report: {links}</p>")
    return "\n".join(parts)


def _study_rows(st: dict) -> list[str]:
    """The study's headline numbers, in METRIC_LABELS' order and then any other."""
    keys = list(dict.fromkeys(k for h in st["headline"].values() for k in h))
    return [k for k in METRIC_LABELS if k in keys] + [k for k in keys if k not in METRIC_LABELS]


def _page(title: str, note: str, tables: str, figs: list) -> str:
    """One self-contained HTML page: title, note, tables, then each (id, title, figure, caption)."""
    nav = " ".join(f'<a href="#{_e(sid)}">{_e(t)}</a>' for sid, t, _, _ in figs)
    parts = ["<!DOCTYPE html><html lang=en><head><meta charset=utf-8>", f"<title>{_e(title)}</title>", _STYLE,
             _ERROR_HOOK, f"<script>{get_plotlyjs()}</script></head><body>",
             '<pre id="js-errors" data-count="0" hidden></pre>', f"<h1>{_e(title)}</h1>",
             f"<p class=note>{note}</p>", tables, f"<nav>{nav}</nav>"]
    for sid, t, fig, caption in figs:
        div = pio.to_html(fig, full_html=False, include_plotlyjs=False, div_id=f"fig-{sid}",
                          config={"responsive": True, "displaylogo": False})
        parts.append(f'<section id="{_e(sid)}"><h2>{_e(t)}</h2><p class=caption>{_e(caption)}</p>{div}</section>')
    parts += [_DONE_HOOK, "</body></html>"]
    return "\n".join(parts)


def render_report(a: dict, *, title: str | None = None) -> str:
    """The report of an analysis, or of a study across seeds (schema geomlab.study/1), as one
    self-contained HTML string (plotly.js inlined once)."""
    if a.get("schema", "").startswith("geomlab.study/"):
        note = (f"study of {len(a['seeds'])} seed(s): {_e(', '.join(map(str, a['seeds'])))} · model "
                f"{_e(a.get('model', ''))} · probe sets: {_e(', '.join(a['domains']))} · schema {_e(a['schema'])}")
        return _page(title or f"geomlab study — {', '.join(a['sources'])}", note, _study_tables(a), study_figures(a))
    src = a.get("source", {})
    note = (f"{_e(src.get('kind', ''))} · model {_e(a.get('model', ''))} · probe sets: "
            f"{_e(', '.join(a.get('domains', [])))} · schema {_e(a.get('schema', ''))}")
    return _page(title or f"geomlab analysis — {src.get('path', '')}", note, _summary_table(a), figures(a))


def write_report(a: dict, path) -> Path:
    """Write `render_report(a)` (an analysis or a study) atomically to `path`; returns the path."""
    path = Path(path)
    atomic_write_text(path, render_report(a))
    return path
