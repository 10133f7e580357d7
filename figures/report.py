"""The HTML report: every figure of `geomlab.figures` with its caption, plotly.js inlined once, opens
offline. One page for an analysis, another for a study across seeds (figures/study.py)."""
from __future__ import annotations

import html
from pathlib import Path

import plotly.io as pio
from plotly.offline import get_plotlyjs

from geomlab.io import atomic_write_text

from .plots import figures
from .study import METRIC_LABELS, fmt, label, study_figures
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


def _ci_cell(key: str, h: dict) -> str:
    """mean ± the half-width of its 95% CI (the mean alone with one seed); the seeds' values on hover."""
    if h is None or h["mean"] is None:
        return "<td>–</td>"
    values = ", ".join(fmt(key, v) for v in h["values"])
    half = f" ± {fmt(key, (h['ci'][1] - h['ci'][0]) / 2).lstrip('+')}" if h["ci"] else ""
    return f"<td title=\"n = {h['n']}: {_e(values)}\">{fmt(key, h['mean'])}{half}</td>"


def _study_tables(st: dict) -> str:
    """The headline numbers as mean ± CI, each strategy against the baseline, and the correlations."""
    keys = _study_rows(st)
    rows = "".join(f"<tr><td>{_e(label(k))}</td>" + "".join(_ci_cell(k, st["headline"][n].get(k))
                                                          for n in st["strategies"]) + "</tr>" for k in keys)
    seeds = ", ".join(map(str, st["seeds"]))
    parts = [f"<table><tr><th>metric</th>{''.join(f'<th>{_e(n)}</th>' for n in st['strategies'])}</tr>{rows}</table>",
             f"<p class=note>Mean over seeds {_e(seeds)} ± the half-width of the 95% confidence interval "
             "(t-interval, docs/definitions.md, \"Statistics across seeds\"); hover a cell for each seed's value. "
             f"Geometry rows (θ to AUC): last checkpoint against the base checkpoint, probe {_e(st['geometry_probe'])}. "
             "– where a value does not exist." + (f" <b>{_e(st['note'])}</b>." if st["note"] else "") + "</p>"]
    cmp = st["comparison"]
    if cmp:
        others = list(cmp["rows"])
        body = ""
        for k in cmp["metrics"]:
            cells = []
            for n in others:
                c = cmp["rows"][n][k]
                if c["mean_difference"] is None:
                    cells.append("<td>–</td>")
                    continue
                ci = f"<br>[{fmt(k, c['ci'][0])}, {fmt(k, c['ci'][1])}]" if c["ci"] else ""
                pv = f"<br>p = {c['p_value']:.3g}" if c["p_value"] is not None else ""
                cells.append(f"<td>{'+' if c['mean_difference'] >= 0 else ''}"
                             f"{fmt(k, c['mean_difference']).lstrip('+')}{ci}{pv}</td>")
            body += f"<tr><td>{_e(label(k))}</td>{''.join(cells)}</tr>"
        base = _e(cmp["baseline"])
        parts += [f"<h2 id=comparison>Against {base} on the same seeds</h2>",
                  f"<table><tr><th>metric</th>{''.join(f'<th>{_e(n)} − {base}</th>' for n in others)}"
                  f"</tr>{body}</table>",
                  f"<p class=note>Mean paired difference over the seeds, its 95% CI, and the p-value of a "
                  f"{_e(cmp['test'])}. Positive: the strategy's number is higher than {_e(cmp['baseline'])}'s.</p>"]
    g = st["geometry_vs_forgetting"]
    body = "".join(
        f"<tr><td>{_e(label(m))}</td><td>{r['n']}</td><td>{_f(r['rho'], '+.3f')}</td>"
        f"<td>{'–' if not r['ci'] else '[{:+.3f}, {:+.3f}]'.format(*r['ci'])}</td>"
        f"<td>{_f(r['p_value'], '.3g')}</td></tr>"
        for m, r in g["spearman"].items())
    parts += ["<h2 id=correlations>Geometry against domain-0 forgetting</h2>",
              f"<table><tr><th>measure</th><th>points</th><th>Spearman ρ</th><th>95% CI</th><th>p</th></tr>{body}"
              "</table>", f"<p class=note>One point per (strategy, seed). CI: {_e(next(iter(g['spearman'].values()))['method'])}, "
              f"{st['settings']['bootstrap_resamples']} resamples, seed {st['settings']['bootstrap_seed']}; "
              "p: scipy.stats.spearmanr, two-sided.</p>"]
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
