"""analyze: the analyser over a synthetic run (traces only), the same with calibration splits and fine
traces (what "disorder or loss" adds), and exact topology drift at N = 20,000.

Targets (issue 4, two CPU cores): 3 strategies × 12 checkpoints × 5 domains × 500 probe pairs analysed
from traces in ≤ 60 s; exact topology drift for N = 20,000 pairs between two checkpoints in ≤ 30 s
and < 1 GiB.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from geomlab.analyze import analyze
from geomlab.figures import render_report
from geomlab.geometry.synthetic import synthetic_run

from .common import print_table, write_json

_DRIFT_CHILD = r"""
import json, sys, time, torch
import torch.nn.functional as F
from geomlab.geometry import topology_drift
n, d = int(sys.argv[1]), int(sys.argv[2])
g = torch.Generator().manual_seed(0)
a = F.normalize(torch.randn(n, d, generator=g), dim=1).half()
b = F.normalize(a.float() + 0.1 * torch.randn(n, d, generator=g), dim=1).half()

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0

try:
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak-RSS mark
except OSError:
    pass
before = status("VmRSS")
t, c = time.perf_counter(), time.process_time()
out = topology_drift(a, b)
seconds, cpu = time.perf_counter() - t, time.process_time() - c
print(json.dumps({"seconds": seconds, "cpu_s": cpu, "peak_rss": status("VmHWM"), "rss_before": before,
                  "mean": out["mean"], "pairs": out["pairs"], "exact": out["exact"]}))
"""


def add_arguments(p) -> None:
    p.add_argument("--strategies", type=int, default=3)
    p.add_argument("--checkpoints", type=int, default=12, help="per strategy, counting the shared base one")
    p.add_argument("--domains", type=int, default=5)
    p.add_argument("--n", type=int, default=500, help="probe pairs per domain")
    p.add_argument("--dim", type=int, default=256, help="embedding width (geomlab-small: 256, ViT-B-32: 512)")
    p.add_argument("--drift-n", type=int, default=20_000, help="N for the exact topology-drift row")
    p.add_argument("--drift-dim", type=int, default=512)
    p.add_argument("--calibration", type=int, default=512,
                   help="calibration pairs per probe set in the 'disorder or loss' row (0: no such row)")
    p.add_argument("--fine-rows", type=int, default=64, help="pairs per probe set in that row's fine traces")
    p.add_argument("--keep", metavar="DIR", help="write the synthetic run here and keep it")
    p.add_argument("--skip-run", action="store_true", help="only the topology-drift row")
    p.add_argument("--skip-drift", action="store_true", help="only the analyser row")


def _analyze_seconds(args, names, **extra) -> tuple[float, dict]:
    """Seconds to analyse a synthetic run of `names` (its other options `extra`), and the result."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "run"
        synthetic_run(root, strategies=names, checkpoints=args.checkpoints, domains=args.domains, n=args.n,
                      d=args.dim, seed=0, **extra)
        t0 = time.perf_counter()
        result = analyze(root, report=False, quiet=True)
        return time.perf_counter() - t0, result


def _bench_disorder(args) -> list[dict]:
    """What the realignment (calibration splits) and the fine-trace series add to an analysis."""
    names = ["finetune", "modx", "joint", "er", "lwf", "ewc"][: args.strategies]
    without, _ = _analyze_seconds(args, names)
    with_, result = _analyze_seconds(args, names, calibration=args.calibration, fine_rows=args.fine_rows)
    realigned = sum(len(p["rows"]) for s in result["strategies"].values()
                    for p in ((s.get("disorder_or_loss") or {}).get("realignment") or {"probes": {}})["probes"].values())
    shape = (f"{args.strategies}x{args.checkpoints}x{args.domains}x{args.n} d={args.dim}, calibration "
             f"{args.calibration}, fine traces of {args.fine_rows}")
    return [{"case": "analyze + disorder or loss", "shape": shape, "seconds": with_,
             "note": f"+{with_ - without:.1f} s over the same run without ({without:.1f} s): {realigned} realignments; "
                     f"load average {os.getloadavg()[0]:.1f}"}]


def _bench_run(args) -> list[dict]:
    names = ["finetune", "modx", "joint", "er", "lwf", "ewc"][: args.strategies]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or Path(tmp) / "run")
        synthetic_run(root, strategies=names, checkpoints=args.checkpoints, domains=args.domains, n=args.n,
                      d=args.dim, seed=0)
        c0 = time.process_time()
        t0 = time.perf_counter()
        result = analyze(root, report=False, quiet=True)
        t1 = time.perf_counter()
        text = render_report(result)
        t2 = time.perf_counter()
        cpu = time.process_time() - c0
        size = len(json.dumps(result, separators=(",", ":")))
    shape = f"{args.strategies}x{args.checkpoints}x{args.domains}x{args.n} d={args.dim}"
    total = t2 - t0
    return [
        {"case": "analyze: traces to analysis.json", "shape": shape, "seconds": t1 - t0,
         "note": f"analysis.json {size / 2**20:.1f} MiB"},
        {"case": "render report", "shape": shape, "seconds": t2 - t1,
         "note": f"report.html {len(text) / 2**20:.1f} MiB"},
        {"case": "analyze total", "shape": shape, "seconds": total, "cpu_s": cpu, "target_s": 60.0, "ok": total <= 60.0,
         "note": f"load average {os.getloadavg()[0]:.1f}"},
    ]


def _bench_drift(args) -> list[dict]:
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-c", _DRIFT_CHILD, str(args.drift_n), str(args.drift_dim)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"topology-drift benchmark failed:\n{proc.stderr}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    extra = (r["peak_rss"] - r["rss_before"]) / 2**20
    return [{"case": "topology drift, exact", "shape": f"N={args.drift_n} d={args.drift_dim}", "seconds": r["seconds"],
             "cpu_s": r["cpu_s"], "target_s": 30.0, "peak_rss_mib": r["peak_rss"] / 2**20, "extra_mib": extra,
             "ok": r["seconds"] <= 30.0 and r["peak_rss"] < 2**30 and r["exact"],
             "note": f"{r['pairs']:,} pairs, mean {r['mean']:.3f}°; load average {os.getloadavg()[0]:.1f}"}]


def run(args) -> int:
    rows = []
    if not args.skip_run:
        rows += _bench_run(args)
        if args.calibration:
            rows += _bench_disorder(args)
    if not args.skip_drift:
        rows += _bench_drift(args)
    print_table(rows, ["case", "shape", "seconds", "cpu_s", "target_s", "ok", "peak_rss_mib", "extra_mib", "note"])
    write_json(args.json, "analyze", rows)
    return 0 if all(r.get("ok", True) for r in rows) else 1
