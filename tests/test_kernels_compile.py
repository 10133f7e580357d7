"""The Triton kernels (kernels/losses_triton.py, kernels/ranking_triton.py) compiled for an
H100/H200, GPUTarget("cuda", 90, 32), on this machine (Triton's bundled ptxas, no GPU, a fresh
cache): the default configuration of every kernel, in bf16 and fp32, builds, uses tensor-core MMA
instructions, fits sm_90's shared memory and spills no register, and the two launches of
retrieval ranks (positives, counts) use the same MMA instruction, so a positive equals its entry
in the counting tiles bit for bit. Every configuration, dtype and mode: `python -m geomlab.bench
gpu --compile all` (minutes; its table is in the README's "GPU check")."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from geomlab.benchmarks.gpu import SM90_SHARED_BYTES


def test_default_configs_compile_for_sm90(tmp_path):
    # the report imports the kernel modules, which read TRITON_INTERPRET once: a fresh process
    proc = subprocess.run([sys.executable, "-m", "geomlab.bench", "gpu", "--compile", "representative",
                           "--out", str(tmp_path), "--jobs", "2"],
                          env=dict(os.environ, TRITON_INTERPRET="0"), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "compile.json").read_text())["rows"]
    kernels = {"_similarity_kernel", "_topk_kernel", "_ranks_kernel", "_loss_fwd", "_loss_bwd"}
    assert {r["kernel"] for r in rows} == kernels and {r["dtype"] for r in rows} == {"bf16", "fp32"}
    for r in rows:
        what = f"{r['label']} {r['dtype']} {r['config']}"
        assert "error" not in r, f"{what}: {r['error']}"
        assert r["spill_bytes"] == 0, f"{what}: {r['spill_bytes']} bytes of register spills"
        assert r["shared"] <= SM90_SHARED_BYTES, f"{what}: {r['shared']} bytes of shared memory"
        assert r["mma"], f"{what}: no tensor-core instruction"
    ranks = {(r["dtype"], r["label"].split()[1]): r["mma"] for r in rows if r["kernel"] == "_ranks_kernel"}
    for dtype in ("bf16", "fp32"):
        assert ranks[dtype, "positives"] == ranks[dtype, "counts"]
