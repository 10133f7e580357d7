"""The HTML report: every figure of `geomlab.figures`, plotly.js inlined once, opens offline."""
from __future__ import annotations

import html
from pathlib import Path

import plotly.io as pio
from plotly.offline import get_plotlyjs

from geomlab.io import atomic_write_text

from .plots import figures
from .summary import headline_numbers

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
nav a { margin-right: 12px; font-size: 0.9em; } #js-errors { color: #b00; }
</style>"""


def _e(s) -> str:
    return html.escape(str(s), quote=True)


def _f(v, spec=".3f") -> str:
    return "–" if v is None else format(v, spec)


def _summary_table(a: dict) -> str:
    d0 = a["domains"][0]
    rows = []
    for name, h in headline_numbers(a).items():
        g = h["vs_base"] or {}
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in (
            _e(name), h["checkpoints"], _f(h["average"]), _f(h["mean_forgetting"]), _f(h["bwt"], "+.3f"),
            _f(g.get("rotation_image"), ".1f"), _f(g.get("rotation_text"), ".1f"),
            _f(g.get("rigid_share_image"), ".2f"), _f(g.get("desync"), ".1f"), _f(g.get("forgotten"), ".2f"),
            _f(g.get("auc_alignment_drift"), ".2f"))) + "</tr>")
    head = ("strategy", "checkpoints", "average R@1", "mean forgetting", "BWT", "θ image (°)", "θ text (°)",
            "rigid share (image)", "desync (°)", "forgotten i→t", "AUC Δφ→forgotten")
    return (f"<table><tr>{''.join(f'<th>{_e(h)}</th>' for h in head)}</tr>{''.join(rows)}</table>"
            f"<p class=note>Geometry columns: last checkpoint against the base checkpoint, probe {_e(d0)}.</p>")


def render_report(a: dict, *, title: str | None = None) -> str:
    """The report as one self-contained HTML string (plotly.js inlined once)."""
    src = a.get("source", {})
    title = title or f"geomlab analysis — {src.get('path', '')}"
    figs = figures(a)
    nav = " ".join(f'<a href="#{sid}">{_e(t)}</a>' for sid, t, _ in figs)
    parts = ["<!DOCTYPE html><html lang=en><head><meta charset=utf-8>", f"<title>{_e(title)}</title>", _STYLE,
             _ERROR_HOOK, f"<script>{get_plotlyjs()}</script></head><body>",
             '<pre id="js-errors" data-count="0" hidden></pre>',
             f"<h1>{_e(title)}</h1>",
             f"<p class=note>{_e(src.get('kind', ''))} · model {_e(a.get('model', ''))} · probe sets: "
             f"{_e(', '.join(a.get('domains', [])))} · schema {_e(a.get('schema', ''))}</p>",
             _summary_table(a), f"<nav>{nav}</nav>"]
    for i, (sid, t, fig) in enumerate(figs):
        div = pio.to_html(fig, full_html=False, include_plotlyjs=False, div_id=f"fig-{sid}",
                          config={"responsive": True, "displaylogo": False})
        parts.append(f'<section id="{_e(sid)}"><h2>{_e(t)}</h2>{div}</section>')
    parts += [_DONE_HOOK, "</body></html>"]
    return "\n".join(parts)


def write_report(a: dict, path) -> Path:
    """Write `render_report(a)` atomically to `path`; returns the path."""
    path = Path(path)
    atomic_write_text(path, render_report(a))
    return path
