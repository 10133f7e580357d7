"""pytest plugin of the GPU check (python -m geomlab.bench gpu, geomlab/benchmarks/gpu.py): the
kernel tests' triton backend runs natively on CUDA tensors instead of under the interpreter.

Load it with `-p triton_cuda_plugin` (tests/ on PYTHONPATH) and TRITON_INTERPRET=0 in the
environment (conftest.py only sets TRITON_INTERPRET when it is unset). The tests build CPU
tensors; the triton backend's functions get CUDA copies (autograd flows back to the CPU leaves)
and return CPU results, so every assertion runs unchanged. Autotuning is narrowed to each kernel's
first configuration that its pruning keeps, so the run compiles each kernel variant once.
"""
from __future__ import annotations

import pytest
import torch


def _to(x, device):
    if torch.is_tensor(x):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(_to(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


def _on_cuda(fn):
    def wrapped(*args, **kwargs):
        return _to(fn(*_to(args, "cuda"), **_to(kwargs, "cuda")), "cpu")
    return wrapped


def _first_config(autotuner) -> None:
    prune = autotuner.early_config_prune
    autotuner.early_config_prune = lambda configs, named_args, **kw: (
        prune(configs, named_args, **kw) if prune else configs)[:1]


def pytest_configure(config):
    from geomlab import kernels
    from geomlab.kernels import _triton, losses_triton, ranking_triton

    if _triton.INTERPRET or not torch.cuda.is_available():
        raise pytest.UsageError("triton_cuda_plugin needs a CUDA device and TRITON_INTERPRET=0")
    for module in (losses_triton, ranking_triton):
        for value in vars(module).values():
            if hasattr(value, "configs") and hasattr(value, "early_config_prune"):
                _first_config(value)
    triton_backend = kernels.IMPLEMENTATIONS["triton"]
    kernels.IMPLEMENTATIONS["triton"] = lambda: kernels.Backend(*(_on_cuda(f) for f in triton_backend()))
