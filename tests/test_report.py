"""The HTML reports (one run's analysis and a study across seeds) in a real headless browser: every
figure renders with its caption, no JavaScript error, and text from the data (captions, strategy
names) cannot execute."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from geomlab.analyze import analyze, analyze_study
from geomlab.data import ProbeSet
from geomlab.figures import figures, study_figures, write_report
from geomlab.figures.summary import MISSING
from geomlab.geometry.sphere import SphereProjection
from geomlab.geometry.synthetic import synthetic_run, synthetic_study
from geomlab.rundir import RunDir
from geomlab.traces import read_trace

EVIL_STRATEGY = "x<img src=x onerror=document.body.setAttribute('data-pwned','strategy')>"
EVIL_CAPTIONS = [
    "</script><script>document.body.setAttribute('data-pwned','script')</script>",
    "<img src=x onerror=\"document.body.setAttribute('data-pwned','img')\">",
    "a red <b>circle</b> & \"quotes\"",
]


def find_chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    # Never skipped: a report nobody checked rendering is not tested. `make test` installs it.
    pytest.fail("chromium is not installed (make test installs it: `make browser`)")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = synthetic_run(tmp_path_factory.mktemp("runs") / "evil", strategies=("finetune", EVIL_STRATEGY),
                         checkpoints=4, domains=3, n=40, d=16, seed=2, calibration=48, fine_rows=12)
    a = analyze(root, report=False, quiet=True)
    # captions as the probe data would give them, every one of them hostile
    first = read_trace(RunDir(root).trace_path("base", 0, 100))
    first.domains = {d: first.domains[d] for d in a["domains"]}  # the scored probe sets (no calibration sets)
    captions = {d: ProbeSet(d, None, [EVIL_CAPTIONS[i % len(EVIL_CAPTIONS)] for i in range(len(e.ids))],
                            torch.arange(len(e.ids)), e.ids.clone())
                for d, e in first.domains.items()}
    samples = SphereProjection.fit(first).samples(first, captions)
    assert all(samples[d]["ids"] == a["sphere"]["samples"][d]["ids"] for d in samples)  # the pairs analyze shows
    a["sphere"]["samples"] = samples
    path = write_report(a, root / "analysis" / "report.html")
    return path, a


def test_report_is_offline_and_escaped(report):
    path, a = report
    text = path.read_text()
    tags = re.findall(r"<script[^>]*>", text)
    assert tags and all(t == "<script>" for t in tags)  # nothing loaded from elsewhere: plotly.js is inlined ...
    assert len(re.findall(r"plotly\.js v\d", text)) == 1  # ... once
    for raw in EVIL_CAPTIONS[:2] + [EVIL_STRATEGY]:
        assert raw not in text
    ids = a["sphere"]["samples"]["domain0"]["ids"]
    assert a["sphere"]["samples"]["domain0"]["captions"] == [EVIL_CAPTIONS[i % 3] for i in range(len(ids))]
    assert [name for _, name, _, _ in figures(a)[-len(a["strategies"]):]] == [f"Sphere: {s}" for s in a["strategies"]]
    # the synthetic run records zero-shot accuracies; its calibration splits and fine traces give the
    # "Disorder or loss?" and lead/lag sections (no forecast: that needs two seeds)
    assert len(figures(a)) == 11 + len(a["strategies"])
    assert [sid for sid, _, _, _ in figures(a)][9:11] == ["disorder-or-loss", "lead-lag"]


def test_summary_table_shows_the_headline_numbers(report):
    path, a = report
    text = path.read_text()
    table = re.search(r"<table>(.*?)</table>", text, re.S).group(1)
    rows = re.findall(r"<tr>(.*?)</tr>", table, re.S)[1:]
    assert len(rows) == len(a["strategies"])
    for row, (name, s) in zip(rows, a["strategies"].items()):
        cells = re.findall(r"<td>(.*?)</td>", row, re.S)
        acc, g = s["accuracy"], s["vs_base"][-1]["domain0"]
        auc = g["flips"]["image_to_text"]["auc_alignment_drift"]
        assert cells[1:] == [str(len(s["checkpoints"])), f"{acc['last']:.3f}", f"{acc['avg']:.3f}",
                             f"{acc['bwt']:+.3f}", f"{acc['mean_forgetting']:.3f}", f"{acc['transfer']:.3f}",
                             f"{acc['domain0']['r1']:.3f}", f"{acc['last_domain']['r1']:.3f}",
                             f"{g['rotation']['image']['mean']:.1f}",
                             f"{g['rotation']['text']['mean']:.1f}", f"{g['procrustes']['image']['rigid_share']:.2f}",
                             f"{g['deviation']['desync']['mean']:.1f}",
                             f"{g['flips']['image_to_text']['forgotten']:.2f}", MISSING if auc is None else f"{auc:.2f}"]


@pytest.fixture(scope="module")
def study_report(tmp_path_factory):
    root = synthetic_study(tmp_path_factory.mktemp("runs") / "evil-study", [0, 1],
                           strategies=("finetune", EVIL_STRATEGY), checkpoints=4, domains=3, n=40, d=16,
                           calibration=48, fine_rows=12)
    st = analyze_study([root], report=False, quiet=True)
    return write_report(st, root / "analysis" / "report.html"), st


def captions(path) -> list[str]:
    return re.findall(r'<section id="[^"]+"><h2>[^<]+</h2><p class=caption>([^<]*)</p>', Path(path).read_text())


def test_every_figure_has_a_caption(report, study_report):
    for (path, a), figs in ((report, figures(report[1])), (study_report, study_figures(study_report[1]))):
        found = captions(path)
        assert len(found) == len(figs) and all(len(c) > 60 for c in found)
        assert "A[t][p]" in found[0]  # each caption is its own figure's
    path, st = study_report
    text = path.read_text()
    assert EVIL_STRATEGY not in text  # escaped in the tables, figures and captions alike
    assert {sid for sid, *_ in study_figures(st)} >= {"accuracy", "forgetting", "geometry", "retention",
                                                       "geometry-forgetting"}


def test_sphere_legend_names_colours_and_markers(report):
    _, a = report
    fig = dict((sid, f) for sid, _, f, _ in figures(a))["sphere-0"]
    shown = [t for t in fig.data if t.type == "scatter3d" and t.visible]
    assert {(t.legendgrouptitle.text, t.name, t.marker.symbol) for t in shown} == {
        (f"probe set {d}", mod, symbol) for d in a["domains"] for mod, symbol in (("image", "circle"), ("text", "diamond"))}
    assert len({t.marker.color for t in shown}) == len(a["domains"])  # one colour per probe set
    assert "colour: probe set" in fig.layout.legend.title.text and "image" in fig.layout.legend.title.text
    first = next(t for t in shown if t.legendgroup == "domain0" and t.name == "image")
    assert first.hovertext[1].endswith(EVIL_CAPTIONS[1].replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
                                       .replace("'", "&#x27;"))  # hover: the caption, escaped


def test_sphere_slider_moves_each_trace_to_its_checkpoint(report):
    _, a = report
    s = a["strategies"][next(iter(a["strategies"]))]
    fig = dict((sid, f) for sid, _, f, _ in figures(a))["sphere-0"]
    points = [k for k, t in enumerate(fig.data) if t.type == "scatter3d"]
    assert len(points) == 2 * len(a["domains"])  # each caption held once, not once per checkpoint
    steps = fig.layout.sliders[0].steps
    assert len(steps) == len(s["sphere"]) > 1
    for k, step in enumerate(steps):
        moved, traces = step.args
        assert step.method == "restyle" and list(traces) == points
        for j, t in enumerate(traces):
            d, mod = fig.data[t].legendgroup, fig.data[t].name
            for i, axis in enumerate("xyz"):
                assert moved[axis][j] == [p[i] for p in s["sphere"][k][d][mod]]
                if k == 0:  # the slider starts where the traces are drawn
                    assert list(fig.data[t][axis]) == moved[axis][j]


def check_renders_in_chromium(path, n: int, tmp_path):
    """Every one of the report's `n` figures rendered by headless Chromium, with no script error."""
    chromium = find_chromium()
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--enable-unsafe-swiftshader", f"--user-data-dir={tmp_path / 'profile'}",
           "--virtual-time-budget=20000", "--dump-dom", Path(path).resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    dom = proc.stdout
    assert proc.returncode == 0 and "</html>" in dom, proc.stderr[-2000:]
    body = re.search(r"<body[^>]*>", dom).group(0)
    assert f'data-figures="{n}"' in body and f'data-figures-rendered="{n}"' in body, body
    errors = re.search(r'<pre id="js-errors" data-count="(\d+)"[^>]*>(.*?)</pre>', dom, re.S)
    assert errors and errors.group(1) == "0", errors and errors.group(2)
    assert "data-pwned" not in body  # neither the captions nor the strategy name ran
    # every figure's div holds plotly's SVG; the 3-D views also hold their WebGL canvas
    divs = re.split(r'(?=<div id="fig-)', dom)[1:]
    ids = [re.match(r'<div id="(fig-[^"]+)"', d).group(1) for d in divs]
    assert len(ids) == n
    for fid, d in zip(ids, divs):
        assert 'class="main-svg"' in d, f"{fid} did not render"
        if fid.startswith("fig-sphere"):
            assert "<canvas" in d, f"{fid}: no WebGL canvas"


def test_report_renders_in_headless_chromium(report, tmp_path):
    path, a = report
    check_renders_in_chromium(path, len(figures(a)), tmp_path)


def test_study_report_renders_in_headless_chromium(study_report, tmp_path):
    path, st = study_report
    check_renders_in_chromium(path, len(study_figures(st)), tmp_path)
