"""The kernel benchmark (geomlab/benchmarks/kernels.py): a quick run times every requested case."""
from __future__ import annotations

import json


def test_bench_quick(tmp_path):
    from geomlab import bench

    out = tmp_path / "kernels.json"
    assert bench.main(["kernels", "--quick", "--ops", "topk,ranks", "--impls", "torch,reference,eager",
                       "--data", "rank0,unrelated", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["suite"] == "kernels"
    # one timed row per requested (op, implementation, data kind), at the quick size, none failed
    # or skipped, each with the median rank measured on its data
    cases = {(r["op"], r["impl"], r["B"], r["d"], r["data"]) for r in data["rows"]}
    assert len(data["rows"]) == len(cases) == 12
    assert cases == {(op, impl, 256, 64, kind) for op in ("topk", "ranks") for impl in ("torch", "reference", "eager")
                     for kind in ("rank0", "unrelated")}
    assert all(r.get("ms", 0) > 0 and "note" not in r for r in data["rows"]), data["rows"]
    median = {r["data"]: r["median_rank"] for r in data["rows"]}
    assert median["rank0"] == 0 and median["unrelated"] > 64


def test_data_kinds_reach_their_median_rank():
    """The noise scale of each data kind puts the measured median rank where the kind says, at two
    sizes (the formula of common.caption_noise is an approximation: within a factor 1.5)."""
    from geomlab.benchmarks.common import DATA_KINDS, median_rank, probe_pair

    for n, d in ((2000, 64), (6000, 256)):
        for kind, target in DATA_KINDS.items():
            got = median_rank(*probe_pair(kind, n, d))
            want = n / 2 if target is None else target * n if 0 < target < 1 else target
            assert (got == 0) if want == 0 else (want / 1.5 <= got <= want * 1.5), (n, d, kind, got)


def test_every_bench_command_answers_help(capsys):
    """--help of each bench command prints its options (a % in a help string, as in "rank1%", once made
    argparse raise instead)."""
    import pytest

    from geomlab import bench
    for command in ("kernels", "train", "analyze", "gpu"):
        with pytest.raises(SystemExit) as stop:
            bench.main([command, "--help"])
        assert stop.value.code == 0, command
        assert "usage:" in capsys.readouterr().out
