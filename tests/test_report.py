"""The HTML report in a real headless browser: every figure renders, no JavaScript error, and text
from the data (captions, strategy names) cannot execute."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from geomlab.analyze import analyse, discover, load_traces, Embedder
from geomlab.data import ProbeSet
from geomlab.figures import figures, write_report
from geomlab.geometry.synthetic import synthetic_run

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
                         checkpoints=4, domains=3, n=40, d=16, seed=2)
    source = discover(root)
    traces = load_traces(source, Embedder(root / "analysis" / "cache", None, None, None, "cpu"), quiet=True)
    first = traces[source.series["finetune"][0].key][0]
    captions = {}
    for d, e in first.domains.items():
        caps = [EVIL_CAPTIONS[i % len(EVIL_CAPTIONS)] for i in range(len(e.ids))]
        captions[d] = ProbeSet(d, None, caps, torch.arange(len(e.ids)), e.ids.clone())
    a = analyse(source, traces, captions=captions, quiet=True)
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
    assert a["sphere"]["samples"]["domain0"]["captions"][0] == EVIL_CAPTIONS[0]  # the data keeps the raw text
    assert len(figures(a)) == 8 + len(a["strategies"])


def test_report_renders_in_headless_chromium(report, tmp_path):
    path, a = report
    chromium = find_chromium()
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--enable-unsafe-swiftshader", f"--user-data-dir={tmp_path / 'profile'}",
           "--virtual-time-budget=20000", "--dump-dom", Path(path).resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    dom = proc.stdout
    assert proc.returncode == 0 and "</html>" in dom, proc.stderr[-2000:]
    body = re.search(r"<body[^>]*>", dom).group(0)
    n = len(figures(a))
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
