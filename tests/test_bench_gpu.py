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


def test_gpu_check_dense_baselines_on_every_data_kind():
    """The GPU check's dense baselines, which its ranking rows are compared with (run here on the
    CPU, small), on each data kind it measures: the dense reference's ranks and top-k."""
    from geomlab.benchmarks import gpu
    from geomlab.benchmarks.common import DATA_KINDS, probe_pair
    from geomlab.kernels import reference

    for kind in DATA_KINDS:
        image, text = probe_pair(kind, 300, 32, seed=1)
        got, want = gpu._dense_ranks(image, text), reference.retrieval_ranks(image, text)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), kind
        v, i = gpu._dense_topk(image, text, gpu.TOPK_K)
        rv, ri = reference.topk(image, text, gpu.TOPK_K)
        assert torch.equal(v, rv) and torch.equal(i, ri), kind
