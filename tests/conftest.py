"""Test-suite setup shared by every test module."""
import os

# Triton kernels run on the CPU through the interpreter (docs/definitions.md, "Kernels"); this must
# be set before triton (or geomlab.kernels) is imported anywhere.
os.environ.setdefault("TRITON_INTERPRET", "1")

# geomlab sets OpenMP's spin count (geomlab/runtime.py) before torch loads: import it first, so
# that the suite runs under the same setting as the commands.
import geomlab  # noqa: E402,F401


import copy  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="module")
def trainer(request, tmp_path_factory):
    """A Trainer of the test module's SMALL config overrides (model, stream; nothing written), its
    initial weights kept as `.initial`."""
    from geomlab import train
    from geomlab.config import load_config
    from geomlab.rundir import RunDir
    torch.manual_seed(0)
    t = train.Trainer(load_config(None, request.module.SMALL), run=RunDir(tmp_path_factory.mktemp("run")),
                      dist=train.Dist())
    t.initial = copy.deepcopy(t.model.state_dict())
    return t


@pytest.fixture
def fresh(trainer, tmp_path, monkeypatch):
    """The trainer with the initial weights and an empty run directory of its own (strategies save
    their cross-phase state there)."""
    from geomlab.rundir import RunDir
    trainer.model.load_state_dict(trainer.initial)
    monkeypatch.setattr(trainer, "run", RunDir(tmp_path))
    return trainer
