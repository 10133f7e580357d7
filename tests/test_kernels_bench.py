"""The kernel benchmark (geomlab/benchmarks/kernels.py): a quick run times every requested case."""
from __future__ import annotations

import json


def test_bench_quick(tmp_path):
    from geomlab import bench

    out = tmp_path / "kernels.json"
    assert bench.main(["kernels", "--quick", "--ops", "topk,ranks", "--impls", "torch,reference,eager",
                       "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["suite"] == "kernels"
    # one timed row per requested (op, implementation), at the quick size, none failed or skipped
    cases = {(r["op"], r["impl"], r["B"], r["d"]) for r in data["rows"]}
    assert len(data["rows"]) == len(cases) == 6
    assert cases == {(op, impl, 256, 64) for op in ("topk", "ranks") for impl in ("torch", "reference", "eager")}
    assert all(r.get("ms", 0) > 0 and "note" not in r for r in data["rows"]), data["rows"]
