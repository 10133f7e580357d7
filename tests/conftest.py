"""Test-suite setup shared by every test module."""
import os

# Triton kernels run on the CPU through the interpreter (docs/definitions.md, "Kernels"); this must
# be set before triton (or geomlab.kernels) is imported anywhere.
os.environ.setdefault("TRITON_INTERPRET", "1")

# geomlab sets OpenMP's spin count (geomlab/runtime.py) before torch loads: import it first, so
# that the suite runs under the same setting as the commands.
import geomlab  # noqa: E402,F401
