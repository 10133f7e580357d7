"""The GPU check (geomlab/benchmarks/gpu.py) on a machine without CUDA: one line, exit status 0,
nothing written."""
from __future__ import annotations

import torch


def test_gpu_check_without_cuda(tmp_path, capsys, monkeypatch):
    # the machine without CUDA, also on one that has it (where the check would otherwise run)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    from geomlab import bench

    assert bench.main(["gpu", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "no CUDA device" in out[0]
    assert not (tmp_path / "out").exists()
