"""The GPU check (geomlab/benchmarks/gpu.py) on a machine without CUDA: one line, exit status 0,
nothing written."""
from __future__ import annotations

import pytest
import torch


def test_gpu_check_without_cuda(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the check would run")
    from geomlab import bench

    assert bench.main(["gpu", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "no CUDA device" in out[0]
    assert not (tmp_path / "out").exists()
